//! Token classes → entities, grouped the way Hugging Face's token-classification pipeline does
//! with `aggregation_strategy="simple"` (the reference users compare against):
//!
//! 1. special tokens (the tokenizer's special-tokens mask) are dropped;
//! 2. each label is read as a tag: `B-X` → (B, X), `I-X` → (I, X), anything else → (I, label);
//! 3. a token joins the current group when its tag equals the group's (all its tokens share one)
//!    and it is not a B; otherwise it starts a new group;
//! 4. a group's `entity_group` is its first token's label after the first `-` (the whole label
//!    when it has none), its `score` the mean of its tokens' scores (NaN ignored), its `start`
//!    the first token's start and its `end` the last token's end;
//! 5. groups labelled `O` are dropped.
//!
//! Offsets are characters of the input, as Python indexes strings. `word` is the input's own
//! text between them; Hugging Face decodes the tokens instead, which lowercases for uncased
//! models and drops accents the normalizer stripped.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One entity found in an input.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Entity {
    /// The label without its `B-`/`I-` prefix.
    #[schema(example = "PER")]
    pub entity_group: String,
    /// The mean probability of its tokens' labels.
    #[schema(example = 0.98)]
    pub score: f32,
    /// The input's text from `start` to `end`.
    #[schema(example = "John")]
    pub word: String,
    /// First character (a character index, not a byte index).
    #[schema(example = 0)]
    pub start: usize,
    /// One past the last character.
    #[schema(example = 4)]
    pub end: usize,
}

/// One token's predicted label, where it is in the input (characters), and whether the
/// tokenizer added it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenClass<'a> {
    pub label: &'a str,
    pub score: f32,
    pub start: usize,
    pub end: usize,
    pub special: bool,
}

/// The label the pipeline ignores.
const OUTSIDE: &str = "O";

/// The entities of `text` from its tokens' classes, in token order (see the module).
pub fn entities(text: &str, tokens: &[TokenClass<'_>]) -> Vec<Entity> {
    let mut groups: Vec<Vec<&TokenClass<'_>>> = Vec::new();
    for token in tokens.iter().filter(|t| !t.special) {
        let (begins, token_tag) = tag(token.label);
        match groups.last_mut() {
            Some(group) if !begins && token_tag == group_tag(group) => group.push(token),
            _ => groups.push(vec![token]),
        }
    }
    let chars: Vec<char> = text.chars().collect();
    groups
        .iter()
        .map(|group| entity(&chars, group))
        .filter(|e| e.entity_group != OUTSIDE)
        .collect()
}

/// (whether it begins an entity, its tag): `B-X` → (true, X), `I-X` → (false, X), anything
/// else → (false, the label), as the pipeline's `get_tag`.
fn tag(label: &str) -> (bool, &str) {
    if let Some(tag) = label.strip_prefix("B-") {
        (true, tag)
    } else if let Some(tag) = label.strip_prefix("I-") {
        (false, tag)
    } else {
        (false, label)
    }
}

/// The tag of a group: its last token's (the pipeline compares with the last one; all of a
/// group's tokens have the same).
fn group_tag<'a>(group: &[&TokenClass<'a>]) -> &'a str {
    tag(group[group.len() - 1].label).1
}

/// A group's entity. Python's `label.split("-", 1)[-1]` names it.
fn entity(chars: &[char], group: &[&TokenClass<'_>]) -> Entity {
    let label = group[0].label;
    let name = label.split_once('-').map_or(label, |(_, rest)| rest);
    let (start, end) = (group[0].start, group[group.len() - 1].end);
    let word = chars
        .get(start..end.min(chars.len()))
        .unwrap_or_default()
        .iter()
        .collect();
    Entity {
        entity_group: name.to_string(),
        score: nan_mean(group.iter().map(|t| t.score)),
        word,
        start,
        end,
    }
}

/// The mean of the scores that are numbers (NaN when none is), as numpy's `nanmean`.
fn nan_mean(scores: impl Iterator<Item = f32>) -> f32 {
    let (sum, n) = scores
        .filter(|s| !s.is_nan())
        .fold((0f64, 0u32), |(sum, n), s| (sum + f64::from(s), n + 1));
    if n == 0 {
        f32::NAN
    } else {
        (sum / f64::from(n)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens of `text` split on spaces, each with its label and score, special tokens around.
    fn tokens<'a>(text: &str, labels: &[(&'a str, f32)]) -> Vec<TokenClass<'a>> {
        let mut out = vec![special("B-MISC")];
        let mut position = 0;
        for (word, &(label, score)) in text.split(' ').zip(labels) {
            let length = word.chars().count();
            out.push(TokenClass {
                label,
                score,
                start: position,
                end: position + length,
                special: false,
            });
            position += length + 1;
        }
        out.push(special("I-MISC"));
        out
    }

    fn special(label: &str) -> TokenClass<'_> {
        TokenClass {
            label,
            score: 0.1,
            start: 0,
            end: 0,
            special: true,
        }
    }

    fn summary(entities: &[Entity]) -> Vec<(&str, &str, usize, usize)> {
        entities
            .iter()
            .map(|e| (e.entity_group.as_str(), e.word.as_str(), e.start, e.end))
            .collect()
    }

    #[test]
    fn bio_sequences_group_as_the_pipeline_does() {
        let text = "John Smith lives in New York City";
        let labels = [
            ("B-PER", 0.9),
            ("I-PER", 0.7),
            ("O", 0.99),
            ("O", 0.99),
            ("B-LOC", 0.8),
            ("I-LOC", 0.6),
            ("I-LOC", 0.4),
        ];
        let found = entities(text, &tokens(text, &labels));
        assert_eq!(
            summary(&found),
            [
                ("PER", "John Smith", 0, 10),
                ("LOC", "New York City", 20, 33)
            ]
        );
        assert!((found[0].score - 0.8).abs() < 1e-6);
        assert!((found[1].score - 0.6).abs() < 1e-6);
    }

    #[test]
    fn a_b_starts_a_new_group_and_a_changed_tag_too() {
        let text = "a b c d e f";
        let labels = [
            ("B-PER", 0.5),
            ("B-PER", 0.5), // B: new group even with the same tag
            ("I-PER", 0.5), // joins b
            ("I-LOC", 0.5), // other tag: new group (an I may start one)
            ("O", 0.5),
            ("I-LOC", 0.5), // after O: new group
        ];
        let found = entities(text, &tokens(text, &labels));
        assert_eq!(
            summary(&found),
            [
                ("PER", "a", 0, 1),
                ("PER", "b c", 2, 5),
                ("LOC", "d", 6, 7),
                ("LOC", "f", 10, 11),
            ]
        );
    }

    #[test]
    fn outside_tokens_group_and_are_dropped() {
        let text = "x y z";
        let labels = [("O", 0.9), ("O", 0.9), ("B-ORG", 0.3)];
        let found = entities(text, &tokens(text, &labels));
        assert_eq!(summary(&found), [("ORG", "z", 4, 5)]);
        let all_outside = [("O", 0.9); 3];
        assert!(entities(text, &tokens(text, &all_outside)).is_empty());
    }

    #[test]
    fn non_bio_labels_continue_while_equal_and_keep_their_name() {
        let text = "a b c d e";
        let labels = [
            ("LABEL_1", 0.2),
            ("LABEL_1", 0.4), // same tag, read as I: joins
            ("LABEL_2", 0.5),
            ("B-LABEL_2", 0.5), // a B never joins
            ("I-LABEL_2", 0.5),
        ];
        let found = entities(text, &tokens(text, &labels));
        assert_eq!(
            summary(&found),
            [
                ("LABEL_1", "a b", 0, 3),
                ("LABEL_2", "c", 4, 5),
                ("LABEL_2", "d e", 6, 9),
            ]
        );
        assert!((found[0].score - 0.3).abs() < 1e-6);
        // A dash inside a non-BIO label: named after the first dash, as `split("-", 1)[-1]`.
        let found = entities("q", &tokens("q", &[("geo-city", 0.5)]));
        assert_eq!(found[0].entity_group, "city");
        // `B-O` is the outside label once its prefix is removed: dropped too.
        assert!(entities("q", &tokens("q", &[("B-O", 0.5)])).is_empty());
    }

    #[test]
    fn special_tokens_are_dropped_by_the_mask_not_by_position() {
        // A special token in the middle (a `[SEP]` typed in the text) ends nothing and joins
        // nothing; the first and last tokens here are ordinary ones.
        let classes = [
            TokenClass {
                label: "B-PER",
                score: 0.5,
                start: 0,
                end: 3,
                special: false,
            },
            special("B-LOC"),
            TokenClass {
                label: "I-PER",
                score: 1.0,
                start: 4,
                end: 7,
                special: false,
            },
        ];
        let found = entities("Ann Lee", &classes);
        assert_eq!(summary(&found), [("PER", "Ann Lee", 0, 7)]);
        assert!((found[0].score - 0.75).abs() < 1e-6);
    }

    #[test]
    fn offsets_are_characters_and_the_word_is_the_input_text() {
        // "São" is 3 characters and 4 bytes; the word keeps the input's case and accents.
        let text = "Visit São Paulo, Zürich";
        let classes = [
            TokenClass {
                label: "O",
                score: 0.9,
                start: 0,
                end: 5,
                special: false,
            },
            TokenClass {
                label: "B-LOC",
                score: 0.8,
                start: 6,
                end: 9,
                special: false,
            },
            TokenClass {
                label: "I-LOC",
                score: 0.6,
                start: 10,
                end: 15,
                special: false,
            },
            TokenClass {
                label: "O",
                score: 0.9,
                start: 15,
                end: 16,
                special: false,
            },
            TokenClass {
                label: "B-LOC",
                score: 0.7,
                start: 17,
                end: 23,
                special: false,
            },
        ];
        let found = entities(text, &classes);
        assert_eq!(
            summary(&found),
            [("LOC", "São Paulo", 6, 15), ("LOC", "Zürich", 17, 23)]
        );
    }

    #[test]
    fn nan_scores_are_ignored_in_the_mean() {
        assert_eq!(nan_mean([0.5, f32::NAN, 1.0].into_iter()), 0.75);
        assert!(nan_mean([f32::NAN].into_iter()).is_nan());
    }
}
