//! The share rule: how much of a limit's headroom one gateway instance may admit between
//! two refreshes when the instances cannot decide through one shared store (none is
//! configured, or it is unreachable). Pure, so the rule is tested on its own.
//!
//! Each instance sees the headroom (limit − stored − pending − every instance's reported
//! holds) at its last refresh, and which other instances admitted requests under the
//! same limit in their last interval (*active*; an instance that served none of a
//! subject's traffic does not shrink anyone's share). Between refreshes the instances
//! cannot see each other's admissions, so their caps must add up to at most the
//! headroom. Splitting it evenly would strand the end of a budget: once the headroom is
//! below n × one request's worst case, every instance's share is too small for any
//! request. So the headroom is split into as many shares as whole worst cases fit,
//! given to the first instances by id:
//!
//! - k = ⌊headroom / unit⌋ whole requests fit, for n active instances (this one included);
//! - k ≥ n: each gets headroom / n;
//! - 1 ≤ k < n: the first k instances get headroom / k, the others nothing;
//! - k = 0: the first instance gets it all (a smaller request may still fit).
//!
//! The caps always sum to at most the headroom, and while one worst case fits, some
//! instance can admit it: what stays unused at the end is less than one reservation.

use rust_decimal::Decimal;

/// `a / b` rounded towards zero at 12 places: shares never add up to more than the whole.
fn split(a: Decimal, b: Decimal) -> Decimal {
    (a / b).round_dp_with_strategy(12, rust_decimal::RoundingStrategy::ToZero)
}

/// What one of `n` active instances (this one `rank`th by instance id, from 0) may admit
/// of `headroom` until the next refresh, when a request may take up to `unit`.
pub fn cap(headroom: Decimal, n: usize, rank: usize, unit: Decimal) -> Decimal {
    let headroom = headroom.max(Decimal::ZERO);
    if n <= 1 {
        return headroom;
    }
    let n_dec = Decimal::from(n as u64);
    if unit <= Decimal::ZERO {
        return split(headroom, n_dec);
    }
    let whole = (headroom / unit).floor();
    if whole >= n_dec {
        split(headroom, n_dec)
    } else if whole >= Decimal::ONE {
        if Decimal::from(rank as u64) < whole {
            split(headroom, whole)
        } else {
            Decimal::ZERO
        }
    } else if rank == 0 {
        headroom
    } else {
        Decimal::ZERO
    }
}

/// This instance's rank among the active instances (`others` and itself), by id.
pub fn rank(me: &str, others: &[String]) -> usize {
    others.iter().filter(|o| o.as_str() < me).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    #[test]
    fn alone_an_instance_may_take_everything() {
        assert_eq!(cap(dec!(0.5), 1, 0, dec!(0.0162)), dec!(0.5));
    }

    #[test]
    fn the_end_of_a_budget_is_given_whole() {
        // $0.03 left, requests of up to $0.0162, two instances: only one fits, so the
        // first instance gets all of it (the stranded $0.030).
        assert_eq!(cap(dec!(0.03), 2, 0, dec!(0.0162)), dec!(0.03));
        assert_eq!(cap(dec!(0.03), 2, 1, dec!(0.0162)), dec!(0));
        // Plenty left: halves.
        assert_eq!(cap(dec!(0.5), 2, 1, dec!(0.0162)), dec!(0.25));
        // Three instances, two fit: the first two get halves, the third nothing.
        assert_eq!(cap(dec!(0.04), 3, 0, dec!(0.0162)), dec!(0.02));
        assert_eq!(cap(dec!(0.04), 3, 1, dec!(0.0162)), dec!(0.02));
        assert_eq!(cap(dec!(0.04), 3, 2, dec!(0.0162)), dec!(0));
    }

    #[test]
    fn ranks_are_by_instance_id() {
        let others = vec!["gw-b".to_string(), "gw-d".to_string()];
        assert_eq!(rank("gw-a", &others), 0);
        assert_eq!(rank("gw-c", &others), 1);
        assert_eq!(rank("gw-e", &others), 2);
    }

    proptest! {
        /// Whatever the headroom, unit and number of instances: the caps add up to at most
        /// the headroom, and while one worst case fits, some instance can admit it.
        #[test]
        fn caps_never_add_up_to_more_than_the_headroom(
            headroom_c in 0u32..100_000, unit_c in 0u32..20_000, n in 1usize..8
        ) {
            let headroom = Decimal::new(i64::from(headroom_c), 4);
            let unit = Decimal::new(i64::from(unit_c), 4);
            let caps: Vec<Decimal> = (0..n).map(|r| cap(headroom, n, r, unit)).collect();
            let total: Decimal = caps.iter().copied().sum();
            prop_assert!(total <= headroom, "{caps:?} sum to more than {headroom}");
            if headroom >= unit {
                prop_assert!(caps.iter().any(|c| *c >= unit), "{caps:?}: no instance can admit {unit} of {headroom}");
            }
        }
    }
}
