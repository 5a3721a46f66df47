//! A fraction as Envoy's runtime `featureEnabled` reads a `FractionalPercent`: hit when a draw
//! modulo the denominator falls below the numerator.

use xds_client::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u64,
    pub denominator: u64,
}

impl Fraction {
    /// Every draw hits.
    pub const ALL: Fraction = Fraction {
        numerator: 100,
        denominator: 100,
    };

    /// Absent means 0 %, as a default `FractionalPercent`.
    pub fn from_proto(p: Option<&FractionalPercent>) -> Fraction {
        let p = p.cloned().unwrap_or_default();
        let denominator = match DenominatorType::try_from(p.denominator) {
            Ok(DenominatorType::TenThousand) => 10_000,
            Ok(DenominatorType::Million) => 1_000_000,
            _ => 100,
        };
        Fraction {
            numerator: p.numerator as u64,
            denominator,
        }
    }

    /// A `type.v3.Percent` (0–100, fractional), as Envoy converts it: hundredths of a percent
    /// over ten thousand.
    pub fn from_percent(value: f64) -> Fraction {
        Fraction {
            numerator: (value * 100.0) as u64,
            denominator: 10_000,
        }
    }

    /// With a random draw.
    pub fn hit(self) -> bool {
        self.hit_with(rand::random::<u64>())
    }

    /// With a given draw (a stable one, such as a request id's).
    pub fn hit_with(self, draw: u64) -> bool {
        draw % self.denominator < self.numerator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_fall_below_the_numerator() {
        let f = Fraction::from_percent(12.5);
        assert_eq!(f.numerator, 1250);
        assert!(f.hit_with(1249));
        assert!(!f.hit_with(1250));
        assert!(f.hit_with(11_249));
        assert!(Fraction::ALL.hit_with(99));
        assert!(!Fraction::from_proto(None).hit());
    }
}
