//! Generation parameters checked before tokenization: ranges, `best_of` rules, stop sequences,
//! truncation bounds, and the features refused rather than ignored. Pure: no tokenizer needed.

use super::grammar::grammar_of;
use super::ValidationLimits;
use crate::api::GenerateParameters;
use crate::errors::ValidationError;
use crate::pb;

/// Most alternatives a request may ask for per generated token.
pub const MAX_TOP_N_TOKENS: u32 = 10;

/// Parameters checked before tokenization (pure; no tokenizer needed).
#[derive(Debug, Clone)]
pub(super) struct CheckedParameters {
    pub parameters: pb::NextTokenChooserParameters,
    pub max_new_tokens: Option<u32>,
    pub truncate: Option<usize>,
    pub top_n_tokens: u32,
    pub grammar: Option<pb::Grammar>,
}

/// Checks every parameter range and limit that does not need the token count.
pub(super) fn check_parameters(
    limits: &ValidationLimits,
    p: &GenerateParameters,
) -> Result<CheckedParameters, ValidationError> {
    let best_of = p.best_of.unwrap_or(1);
    if best_of == 0 || best_of > limits.max_best_of {
        return Err(ValidationError::BestOf(limits.max_best_of, best_of));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if temperature <= 0.0 || temperature.is_nan() {
        return Err(ValidationError::Temperature);
    }
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty <= 0.0 || repetition_penalty.is_nan() {
        return Err(ValidationError::RepetitionPenalty);
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ValidationError::TopP);
    }
    let typical_p = p.typical_p.unwrap_or(1.0);
    if !(typical_p > 0.0 && typical_p <= 1.0) {
        return Err(ValidationError::TypicalP);
    }
    let frequency_penalty = penalty("frequency_penalty", p.frequency_penalty)?;
    let presence_penalty = penalty("presence_penalty", p.presence_penalty)?;
    let top_k = match p.top_k {
        Some(k) if k <= 0 => return Err(ValidationError::TopK),
        Some(k) => k as u32,
        None => 0,
    };
    // `best_of` needs the request to ask for sampling: `do_sample`, or any warper given (as
    // LoRAX checks it: given at all, whatever its value).
    let asks_sampling = p.do_sample
        || p.temperature.is_some()
        || p.top_k.is_some()
        || p.top_p.is_some()
        || p.typical_p.is_some();
    if best_of > 1 && !asks_sampling {
        return Err(ValidationError::BestOfSampling);
    }
    if best_of > 1 && p.seed.is_some() {
        return Err(ValidationError::BestOfSeed);
    }
    let do_sample = samples(p.do_sample, temperature, top_k, top_p, typical_p) || best_of > 1;
    let top_n_tokens = p.top_n_tokens.or(p.return_k_alternatives).unwrap_or(0);
    if top_n_tokens > MAX_TOP_N_TOKENS {
        return Err(ValidationError::TopNTokens(MAX_TOP_N_TOKENS, top_n_tokens));
    }
    if p.max_new_tokens == Some(0) {
        return Err(ValidationError::NegativeMaxNewTokens);
    }
    if p.stop.len() > limits.max_stop_sequences {
        return Err(ValidationError::StopSequence(
            limits.max_stop_sequences,
            p.stop.len(),
        ));
    }
    if let Some(t) = p.truncate {
        if t == 0 || t > limits.max_input_length {
            return Err(ValidationError::Truncate(limits.max_input_length, t));
        }
    }
    Ok(CheckedParameters {
        parameters: pb::NextTokenChooserParameters {
            temperature,
            top_k,
            top_p,
            typical_p,
            do_sample,
            seed: p.seed.unwrap_or_else(rand::random),
            repetition_penalty,
            watermark: p.watermark,
            frequency_penalty,
            presence_penalty,
        },
        max_new_tokens: p.max_new_tokens,
        truncate: p.truncate,
        top_n_tokens,
        grammar: grammar_of(p)?,
    })
}

/// A frequency or presence penalty: -2..=2, default 0 (off).
fn penalty(name: &'static str, value: Option<f32>) -> Result<f32, ValidationError> {
    match value {
        None => Ok(0.0),
        Some(v) if (-2.0..=2.0).contains(&v) => Ok(v),
        Some(v) => Err(ValidationError::Penalty(name, v)),
    }
}

/// Whether a request samples. As in LoRAX (and TGI), any logits warper that changes the
/// distribution (`temperature` != 1, `top_k` > 0, `top_p` < 1, `typical_p` < 1) turns sampling
/// on even without `do_sample`; otherwise the request is greedy and its warpers are no-ops.
pub fn samples(do_sample: bool, temperature: f32, top_k: u32, top_p: f32, typical_p: f32) -> bool {
    do_sample || temperature != 1.0 || top_k > 0 || top_p < 1.0 || typical_p < 1.0
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use ValidationError as E;

    pub(in crate::validation) fn limits() -> ValidationLimits {
        ValidationLimits {
            max_best_of: 2,
            max_stop_sequences: 2,
            max_input_length: 6,
            max_total_tokens: 10,
        }
    }

    /// Default parameters changed by `f`.
    pub(in crate::validation) fn params(
        f: impl FnOnce(&mut GenerateParameters),
    ) -> GenerateParameters {
        let mut p = GenerateParameters::default();
        f(&mut p);
        p
    }

    pub(in crate::validation) fn param_error(p: GenerateParameters) -> E {
        check_parameters(&limits(), &p).unwrap_err()
    }

    #[test]
    fn parameter_ranges() {
        let cases = [
            (params(|p| p.temperature = Some(0.0)), E::Temperature),
            (params(|p| p.temperature = Some(-1.0)), E::Temperature),
            (params(|p| p.top_p = Some(0.0)), E::TopP),
            (params(|p| p.top_p = Some(1.01)), E::TopP),
            (params(|p| p.typical_p = Some(0.0)), E::TypicalP),
            (params(|p| p.typical_p = Some(1.5)), E::TypicalP),
            (params(|p| p.top_k = Some(0)), E::TopK),
            (
                params(|p| p.repetition_penalty = Some(0.0)),
                E::RepetitionPenalty,
            ),
            (
                params(|p| p.max_new_tokens = Some(0)),
                E::NegativeMaxNewTokens,
            ),
            (params(|p| p.truncate = Some(0)), E::Truncate(6, 0)),
            (params(|p| p.truncate = Some(7)), E::Truncate(6, 7)),
            (params(|p| p.top_n_tokens = Some(11)), E::TopNTokens(10, 11)),
            (
                params(|p| p.stop = vec!["a".into(), "b".into(), "c".into()]),
                E::StopSequence(2, 3),
            ),
        ];
        for (p, expected) in cases {
            assert_eq!(param_error(p), expected);
        }
        let ok = params(|p| {
            p.top_p = Some(1.0);
            p.typical_p = Some(0.5);
            p.top_k = Some(5);
            p.temperature = Some(0.7);
            p.repetition_penalty = Some(1.2);
            p.stop = vec!["x".into(), "y".into()];
        });
        let checked = check_parameters(&limits(), &ok).unwrap();
        assert_eq!(checked.parameters.top_k, 5);
        assert_eq!(checked.parameters.temperature, 0.7);
    }

    #[test]
    fn best_of_rules() {
        assert_eq!(
            param_error(params(|p| p.best_of = Some(0))),
            E::BestOf(2, 0)
        );
        let too_many = params(|p| {
            p.best_of = Some(3);
            p.do_sample = true;
        });
        assert_eq!(param_error(too_many), E::BestOf(2, 3));
        assert_eq!(
            param_error(params(|p| p.best_of = Some(2))),
            E::BestOfSampling
        );
        let seeded = params(|p| {
            p.best_of = Some(2);
            p.do_sample = true;
            p.seed = Some(1);
        });
        assert_eq!(param_error(seeded), E::BestOfSeed);
        let ok = params(|p| {
            p.best_of = Some(2);
            p.temperature = Some(0.5);
        });
        assert!(check_parameters(&limits(), &ok).is_ok());
    }

    #[test]
    fn warpers_turn_sampling_on() {
        let do_sample = |f: fn(&mut GenerateParameters)| {
            check_parameters(&limits(), &params(f))
                .unwrap()
                .parameters
                .do_sample
        };
        assert!(!do_sample(|_| {}));
        // Warpers at their neutral values do not sample.
        assert!(!do_sample(|p| {
            p.temperature = Some(1.0);
            p.top_p = Some(1.0);
            p.typical_p = Some(1.0);
            p.repetition_penalty = Some(1.3);
        }));
        assert!(do_sample(|p| p.do_sample = true));
        assert!(do_sample(|p| p.temperature = Some(0.7)));
        assert!(do_sample(|p| p.temperature = Some(1.5)));
        assert!(do_sample(|p| p.top_k = Some(1)));
        assert!(do_sample(|p| p.top_p = Some(0.9)));
        assert!(do_sample(|p| p.typical_p = Some(0.5)));
        // best_of > 1 always samples (a warper given at any value asks for it, as in LoRAX).
        assert!(do_sample(|p| {
            p.best_of = Some(2);
            p.temperature = Some(1.0);
        }));
        // Edge values are still refused before anything else.
        assert_eq!(
            param_error(params(|p| {
                p.do_sample = true;
                p.temperature = Some(0.0);
            })),
            E::Temperature
        );
        assert_eq!(
            param_error(params(|p| p.temperature = Some(f32::NAN))),
            E::Temperature
        );
    }

    #[test]
    fn penalties_are_bounded_and_reach_the_shard() {
        for name in ["frequency_penalty", "presence_penalty"] {
            let set = |v: f32| {
                params(|p| match name {
                    "frequency_penalty" => p.frequency_penalty = Some(v),
                    _ => p.presence_penalty = Some(v),
                })
            };
            for bad in [2.01, -2.01, 100.0] {
                assert_eq!(param_error(set(bad)), E::Penalty(name, bad));
            }
            // NaN compares unequal to itself: check the variant and the message.
            let nan = param_error(set(f32::NAN));
            assert!(matches!(nan, E::Penalty(n, v) if n == name && v.is_nan()));
            assert!(nan
                .to_string()
                .starts_with(&format!("`{name}` must be between -2.0 and 2.0")));
            for ok in [-2.0, 0.0, 0.5, 2.0] {
                let checked = check_parameters(&limits(), &set(ok)).unwrap().parameters;
                let (f, p) = (checked.frequency_penalty, checked.presence_penalty);
                assert_eq!(if name == "frequency_penalty" { f } else { p }, ok);
                // Penalties do not turn sampling on.
                assert!(!checked.do_sample);
            }
        }
        let defaults = check_parameters(&limits(), &params(|_| {})).unwrap();
        assert_eq!(defaults.parameters.frequency_penalty, 0.0);
        assert_eq!(defaults.parameters.presence_penalty, 0.0);
        assert!(defaults.grammar.is_none());
        assert_eq!(
            E::Penalty("presence_penalty", 3.0).to_string(),
            "`presence_penalty` must be between -2.0 and 2.0. Given: 3"
        );
    }

    #[test]
    fn watermark_reaches_the_shard() {
        for on in [true, false] {
            let checked = check_parameters(&limits(), &params(|p| p.watermark = on)).unwrap();
            assert_eq!(checked.parameters.watermark, on);
        }
    }

    #[test]
    fn seeds_are_kept_or_drawn() {
        let checked = check_parameters(&limits(), &params(|p| p.seed = Some(42))).unwrap();
        assert_eq!(checked.parameters.seed, 42);
    }
}
