//! Tokenizing the inputs of the encoder endpoints (`/embed`, `/v1/embeddings`, `/classify`,
//! `/classify_batch`): special tokens added (the model was trained with them), offsets in
//! characters (as Python indexes strings, so entities' `start`/`end` match what Hugging Face
//! reports), and never truncated: an embedding of a cut input would silently describe another
//! text, so a long input is refused instead.

use super::{run_blocking, Validation};
use crate::errors::ValidationError;

/// An encoder input as the shard and the entity aggregation need it; one entry per token in
/// each list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderTokens {
    /// Token ids, special tokens included.
    pub ids: Vec<u32>,
    /// Each token's `[start, end)` in characters of the input (special tokens: empty).
    pub offsets: Vec<(usize, usize)>,
    /// Whether the tokenizer added the token (its special-tokens mask).
    pub special: Vec<bool>,
}

impl Validation {
    /// Tokenizes `input` (called `field` in errors) for an encoder call. Refused when it is empty
    /// or longer than `max_length` tokens, special tokens included.
    pub async fn encoder_tokens(
        &self,
        field: &str,
        input: String,
        max_length: usize,
    ) -> Result<EncoderTokens, ValidationError> {
        if input.is_empty() {
            return Err(ValidationError::EmptyField(field.to_string()));
        }
        let tokenizer = self.tokenizer.clone();
        let task = run_blocking(&self.workers, move || {
            tokenizer
                .encode_char_offsets(input, true)
                .map_err(|e| ValidationError::Tokenizer(e.to_string()))
        });
        let encoding = task
            .await
            .map_err(|e| ValidationError::Tokenizer(e.to_string()))??;
        let length = encoding.len();
        if length == 0 {
            return Err(ValidationError::EmptyField(field.to_string()));
        }
        if length > max_length {
            return Err(ValidationError::EncoderInputLength(
                field.to_string(),
                max_length,
                length,
            ));
        }
        Ok(EncoderTokens {
            ids: encoding.get_ids().to_vec(),
            offsets: encoding.get_offsets().to_vec(),
            special: encoding
                .get_special_tokens_mask()
                .iter()
                .map(|&m| m != 0)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_encoder_tokenizer;
    use crate::validation::parameters::tests::limits;
    use ValidationError as E;

    fn validation() -> Validation {
        Validation::new(test_encoder_tokenizer(), limits())
    }

    #[tokio::test]
    async fn adds_both_special_tokens_with_character_offsets() {
        // [CLS] john lives in zurich [SEP]; "Zürich" is characters 14..20 but bytes 14..21:
        // offsets count characters.
        let tokens = validation()
            .encoder_tokens("inputs", "John lives in Zürich".into(), 16)
            .await
            .unwrap();
        assert_eq!(tokens.ids.first(), Some(&2));
        assert_eq!(tokens.ids.last(), Some(&3));
        assert_eq!(tokens.special, [true, false, false, false, false, true]);
        assert_eq!(tokens.offsets[1], (0, 4));
        assert_eq!(tokens.offsets[4], (14, 20));
    }

    #[tokio::test]
    async fn refuses_empty_and_long_inputs_naming_the_field() {
        let v = validation();
        let empty = v.encoder_tokens("inputs[1]", String::new(), 8).await;
        assert_eq!(empty.unwrap_err(), E::EmptyField("inputs[1]".into()));
        // 4 words + [CLS] + [SEP] = 6 tokens: 6 fits, 5 does not.
        let text = "john lives in york";
        assert!(v.encoder_tokens("input", text.into(), 6).await.is_ok());
        let long = v.encoder_tokens("input", text.into(), 5).await.unwrap_err();
        assert_eq!(long, E::EncoderInputLength("input".into(), 5, 6));
        assert_eq!(
            long.to_string(),
            "`input` must have at most 5 tokens, special tokens included (inputs are not \
             truncated). Given: 6"
        );
    }
}
