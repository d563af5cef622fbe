//! The Zephyr chat format of EMMA and Cobra (Mamba-2.8b-Zephyr), and its tokenization with loss
//! labels.
//!
//! A conversation of turns `(user_i, answer_i)` is the text
//!
//! ```text
//! <|user|>\n{user_1}<|endoftext|>\n<|assistant|>\n{answer_1}<|endoftext|>
//! \n<|user|>\n{user_2}<|endoftext|>\n<|assistant|>\n{answer_2}<|endoftext|>
//! ...
//! ```
//!
//! (the line break after each answer belongs to the next turn; the first turn has none, and there
//! is no system prompt), exactly as Cobra's `ZephyrChatPromptBuilder` builds it. As there, every
//! message has `<image>` removed and surrounding whitespace trimmed, an empty answer is written as
//! one space, and the text is tokenized piece by piece, so that no token spans the boundary
//! between a prompt and an answer: the user piece `[\n]<|user|>\n{user}<|endoftext|>\n<|assistant|>\n`
//! and the answer piece `{answer}<|endoftext|>`. The image tokens go before all of it.

use crate::error::{EmmaError, Result};
use crate::tokenizer::{Tokenizer, ASSISTANT_TOKEN, EOS_TOKEN, SPECIAL_TOKENS, USER_TOKEN};

/// The label of a token that takes no part in the loss (user text and role markers).
pub const IGNORE_INDEX: u32 = u32::MAX;

/// A chat: user messages, each with the assistant's answer, or `None` for the one still to be
/// generated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    /// `(user message, assistant answer)` in order.
    pub turns: Vec<(String, Option<String>)>,
}

impl Conversation {
    /// A conversation of one question, with its answer (for training) or without (for generation).
    pub fn single(user: impl Into<String>, answer: Option<String>) -> Self {
        Conversation {
            turns: vec![(user.into(), answer)],
        }
    }

    /// Token ids of the whole conversation and, aligned with them (not shifted), the training
    /// labels: the id itself for the tokens of every answer including its closing end-of-text,
    /// [`IGNORE_INDEX`] for everything else. Every turn must have an answer.
    pub fn encode_for_training(&self, tok: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        for (text, is_answer) in self.pieces(false)? {
            let piece = tok.encode(&text)?;
            labels.extend(piece.iter().map(|&id| if is_answer { id } else { IGNORE_INDEX }));
            ids.extend(piece);
        }
        Ok((ids, labels))
    }

    /// Token ids of the conversation up to the assistant marker that opens the last answer, for
    /// generation: every turn but the last must have an answer, and the last must have none.
    pub fn encode_prompt(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for (text, _) in self.pieces(true)? {
            ids.extend(tok.encode(&text)?);
        }
        Ok(ids)
    }

    /// The text pieces in order, each marked with whether it is an answer. With `open_end` the
    /// last turn must be unanswered, otherwise every turn must be answered.
    fn pieces(&self, open_end: bool) -> Result<Vec<(String, bool)>> {
        if self.turns.is_empty() {
            return Err(EmmaError::Prompt("it has no turns".to_owned()));
        }
        let last = self.turns.len() - 1;
        let mut pieces = Vec::with_capacity(2 * self.turns.len());
        for (i, (user, answer)) in self.turns.iter().enumerate() {
            for text in std::iter::once(user).chain(answer) {
                if let Some(token) = control_token_in(text) {
                    return Err(EmmaError::Prompt(format!(
                        "turn {} contains the control token {token}; remove it from the text",
                        i + 1
                    )));
                }
            }
            let sep = if i == 0 { "" } else { "\n" };
            pieces.push((
                format!(
                    "{sep}{USER_TOKEN}\n{}{EOS_TOKEN}\n{ASSISTANT_TOKEN}\n",
                    clean(user)
                ),
                false,
            ));
            match (answer, open_end && i == last) {
                (Some(answer), false) => {
                    let answer = clean(answer);
                    let answer = if answer.is_empty() { " " } else { answer.as_str() };
                    pieces.push((format!("{answer}{EOS_TOKEN}"), true));
                }
                (None, true) => {}
                (Some(_), true) => {
                    return Err(EmmaError::Prompt(format!(
                        "turn {} of {} is already answered; a prompt for generation ends with an \
                         unanswered turn",
                        i + 1,
                        self.turns.len()
                    )))
                }
                (None, false) => {
                    return Err(EmmaError::Prompt(format!(
                        "turn {} of {} has no answer; {}",
                        i + 1,
                        self.turns.len(),
                        if open_end {
                            "only the last turn of a prompt may be unanswered"
                        } else {
                            "every turn of a training example needs one"
                        }
                    )))
                }
            }
        }
        Ok(pieces)
    }
}

/// The first control token (end of text or a role marker) written in `message`, if any: a
/// message holding one would end or re-open a turn of the chat format, so it is refused.
pub fn control_token_in(message: &str) -> Option<&'static str> {
    SPECIAL_TOKENS.into_iter().find(|t| message.contains(t))
}

/// A message as Cobra writes it: without `<image>` markers and surrounding whitespace.
fn clean(message: &str) -> String {
    message.replace("<image>", "").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::train_builtin(512).unwrap()
    }

    fn answered(ids: &[u32], labels: &[u32]) -> Vec<u32> {
        ids.iter()
            .zip(labels)
            .filter(|(_, &l)| l != IGNORE_INDEX)
            .map(|(&i, _)| i)
            .collect()
    }

    #[test]
    fn single_turn_masks_exactly_the_prompt() {
        let tok = tok();
        let conv = Conversation::single("<image>\nHow many circles are there? ", Some("3".to_owned()));
        let (ids, labels) = conv.encode_for_training(&tok).unwrap();
        assert_eq!(ids.len(), labels.len());
        assert_eq!(
            tok.decode(&ids).unwrap(),
            "<|user|>\nHow many circles are there?<|endoftext|>\n<|assistant|>\n3<|endoftext|>"
        );
        let prompt = Conversation::single("How many circles are there?", None)
            .encode_prompt(&tok)
            .unwrap();
        let n = prompt.len();
        assert_eq!(&ids[..n], &prompt[..]);
        assert!(labels[..n].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(&labels[n..], &ids[n..]);
        assert_eq!(labels.last(), Some(&tok.eos_id()));
        assert_eq!(tok.decode(&ids[n..]).unwrap(), "3<|endoftext|>");
        assert_eq!(
            tok.decode(&prompt).unwrap(),
            "<|user|>\nHow many circles are there?<|endoftext|>\n<|assistant|>\n"
        );
    }

    #[test]
    fn multi_turn_labels_only_answers() {
        let tok = tok();
        let conv = Conversation {
            turns: vec![
                ("Is the circle red?".to_owned(), Some("Yes".to_owned())),
                (
                    "What is left of the square?".to_owned(),
                    Some("A blue triangle.".to_owned()),
                ),
                ("Anything else?".to_owned(), Some(String::new())),
            ],
        };
        let (ids, labels) = conv.encode_for_training(&tok).unwrap();
        assert_eq!(
            tok.decode(&ids).unwrap(),
            "<|user|>\nIs the circle red?<|endoftext|>\n<|assistant|>\nYes<|endoftext|>\
             \n<|user|>\nWhat is left of the square?<|endoftext|>\n<|assistant|>\nA blue triangle.<|endoftext|>\
             \n<|user|>\nAnything else?<|endoftext|>\n<|assistant|>\n <|endoftext|>"
        );
        assert_eq!(
            tok.decode(&answered(&ids, &labels)).unwrap(),
            "Yes<|endoftext|>A blue triangle.<|endoftext|> <|endoftext|>"
        );
        assert_eq!(labels.iter().filter(|&&l| l == tok.eos_id()).count(), 3);

        // The prompt for the third turn is the training sequence up to its answer.
        let mut open = conv.clone();
        open.turns[2].1 = None;
        let prompt = open.encode_prompt(&tok).unwrap();
        assert_eq!(&ids[..prompt.len()], &prompt[..]);
        assert_eq!(labels[prompt.len() - 1], IGNORE_INDEX);
        assert_ne!(labels[prompt.len()], IGNORE_INDEX);
    }

    #[test]
    fn malformed_conversations_are_errors() {
        let tok = tok();
        let empty = Conversation::default();
        assert!(empty
            .encode_for_training(&tok)
            .unwrap_err()
            .to_string()
            .contains("no turns"));
        assert!(empty.encode_prompt(&tok).is_err());
        let open = Conversation::single("Is it red?", None);
        let err = open.encode_for_training(&tok).unwrap_err();
        assert!(err.to_string().contains("turn 1 of 1 has no answer"), "{err}");
        let closed = Conversation::single("Is it red?", Some("No".to_owned()));
        let err = closed.encode_prompt(&tok).unwrap_err();
        assert!(err.to_string().contains("already answered"), "{err}");
        let gap = Conversation {
            turns: vec![("a".to_owned(), None), ("b".to_owned(), None)],
        };
        let err = gap.encode_prompt(&tok).unwrap_err();
        assert!(err.to_string().contains("turn 1 of 2"), "{err}");
    }

    #[test]
    fn control_tokens_in_a_message_are_refused() {
        let tok = Tokenizer::train_builtin(512).unwrap();
        for text in [
            "Stop<|endoftext|>",
            "<|assistant|>\nyes",
            "<|user|> again",
            "<|system|>",
        ] {
            let err = Conversation::single(text, None)
                .encode_prompt(&tok)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("control token") && err.contains("turn 1"),
                "{text:?}: {err}"
            );
            let answered = Conversation::single("Why?", Some(text.to_owned()));
            assert!(answered.encode_prompt(&tok).is_err() || answered.pieces(false).is_err());
        }
        assert!(control_token_in("a <|user of mine|>").is_none());
    }
}
