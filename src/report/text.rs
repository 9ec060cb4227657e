//! The routing report as text for a terminal: [`RoutingReport`]'s `Display`, and
//! [`margin_comparison`] of two gates on the same inputs.
use super::{Margins, RoutingReport, dead_codes, perplexity};
use std::fmt::{self, Display, Formatter, Write};

/// Width of the longest load bar, in characters.
const BAR: usize = 40;

/// A bar of `value` out of `most`, [`BAR`] characters at most.
fn bar(value: u64, most: u64) -> String {
    "#".repeat((value as usize * BAR).div_ceil(most.max(1) as usize))
}

impl Display for RoutingReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "routing report: {}, E = {}, k = {}, {} tokens over {} batch(es)",
            self.source, self.experts, self.k, self.tokens, self.batches
        )?;
        writeln!(
            f,
            "load (slots routed per expert): max/mean {:.3}, coefficient of variation {:.3}",
            self.max_over_mean(),
            self.coefficient_of_variation()
        )?;
        let most = self.routed.iter().copied().max().unwrap_or(0);
        for (e, (&routed, &kept)) in self.routed.iter().zip(&self.kept).enumerate() {
            let dropped = if routed > kept {
                format!(" ({} kept)", kept)
            } else {
                String::new()
            };
            writeln!(f, "  expert {e:4} {routed:8}{dropped} {}", bar(routed, most))?;
        }
        match &self.capacity {
            Some(c) => writeln!(
                f,
                "capacity: {:.1}% filled, {} slots dropped ({:.2}% of routed slots), {} tokens lost a slot, \
                 {} lost every slot and got {}",
                100.0 * self.capacity_fill().unwrap_or(0.0),
                c.dropped_slots,
                100.0 * c.dropped_share(self.tokens, self.k),
                c.tokens_some_dropped,
                c.tokens_all_dropped,
                self.fallback
            )?,
            None => writeln!(f, "capacity: none (no token is dropped)")?,
        }
        writeln!(
            f,
            "non-finite tokens (routed nowhere, output NaN): {} in these batches, {} since the layer was built",
            self.nonfinite_tokens, self.nonfinite_since_built
        )?;
        for t in &self.transitions {
            writeln!(
                f,
                "iteration {} -> {}: first expert changed for {:.1}% of {} tokens, expert set for {:.1}%",
                t.from,
                t.from + 1,
                100.0 * t.first_changed_share(),
                t.tokens,
                100.0 * t.set_changed_share()
            )?;
        }
        if let Some(uses) = &self.codes {
            let dead = dead_codes(uses);
            writeln!(
                f,
                "codes: perplexity {:.2} of {}, {} dead {:?}",
                perplexity(uses),
                uses.len(),
                dead.len(),
                dead
            )?;
        }
        if let Some(m) = &self.margins {
            writeln!(f, "margin ({}): {}", m.scores, summary(m))?;
        }
        if let Some(esft) = &self.esft {
            writeln!(f, "ESFT over {} tokens: selected {:?}", esft.tokens, esft.selected)?;
            writeln!(f, "  expert   gate score  token score")?;
            for (e, (g, r)) in esft.gate.iter().zip(&esft.token).enumerate() {
                let mark = if esft.selected.contains(&e) { " *" } else { "" };
                writeln!(f, "  {e:6} {g:12.5} {r:12.5}{mark}")?;
            }
        }
        Ok(())
    }
}

/// Mean, median and near ties of `m`.
fn summary(m: &Margins) -> String {
    format!(
        "k-th minus (k+1)-th score over {} routed tokens: mean {:.4}, median {:.4}, {:.1}% below 0.01",
        m.values.len(),
        m.mean(),
        m.median(),
        100.0 * m.share_below(0.01)
    )
}

/// Two gates' margins on the same inputs, side by side (e.g. a quadratic gate against the
/// linear one): which one separates the selected experts from the rest by more.
pub fn margin_comparison(name_a: &str, a: &RoutingReport, name_b: &str, b: &RoutingReport) -> String {
    let mut out = String::new();
    for (name, report) in [(name_a, a), (name_b, b)] {
        let line = match &report.margins {
            Some(m) => summary(m),
            None => "no margins (no logits, or k = E)".into(),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{name:>10}: {line}");
    }
    out
}
