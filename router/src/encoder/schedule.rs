//! Which waiting inputs the next encoder call takes: a pure policy over the waiting list, so it
//! is tested without a shard. The oldest input always goes (nothing waits forever behind
//! younger ones); the call is for its task (Embed and Classify are separate RPCs), and takes
//! every other waiting input of that task, oldest first, whose tokens still fit the budget.

use std::collections::VecDeque;

/// What an encoder call computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EncoderTask {
    Embed,
    Classify,
}

impl EncoderTask {
    /// The shard method's name (metrics label, health record, spans).
    pub fn method(self) -> &'static str {
        match self {
            Self::Embed => "embed",
            Self::Classify => "classify",
        }
    }
}

/// An input waiting for its call.
pub trait Waiting {
    fn task(&self) -> EncoderTask;
    /// Its tokens, special tokens included.
    fn tokens(&self) -> u32;
}

/// Takes the next call's inputs out of `waiting` (None when nothing waits): the oldest input,
/// then, in arrival order, each other input of the same task while the call's tokens stay within
/// `max_tokens`. An input that does not fit is left for a later call (it will be the oldest
/// one day), so smaller ones behind it may go first. The oldest goes even when it alone exceeds
/// the budget, which validation prevents.
pub fn take_call<T: Waiting>(
    waiting: &mut VecDeque<T>,
    max_tokens: u32,
) -> Option<(EncoderTask, Vec<T>)> {
    let first = waiting.pop_front()?;
    let task = first.task();
    let mut used = first.tokens();
    let mut taken = vec![first];
    let mut left = VecDeque::with_capacity(waiting.len());
    for input in waiting.drain(..) {
        let fits = used.saturating_add(input.tokens()) <= max_tokens;
        if input.task() == task && fits {
            used += input.tokens();
            taken.push(input);
        } else {
            left.push_back(input);
        }
    }
    *waiting = left;
    Some((task, taken))
}

#[cfg(test)]
mod tests {
    use super::*;
    use EncoderTask::{Classify, Embed};

    #[derive(Debug, PartialEq)]
    struct Input(EncoderTask, u32, &'static str);

    impl Waiting for Input {
        fn task(&self) -> EncoderTask {
            self.0
        }
        fn tokens(&self) -> u32 {
            self.1
        }
    }

    fn names(inputs: &[Input]) -> Vec<&'static str> {
        inputs.iter().map(|i| i.2).collect()
    }

    #[test]
    fn nothing_waits_no_call() {
        let mut waiting: VecDeque<Input> = VecDeque::new();
        assert!(take_call(&mut waiting, 10).is_none());
    }

    #[test]
    fn takes_every_waiting_input_of_the_oldest_task_within_the_budget() {
        let mut waiting = VecDeque::from([
            Input(Embed, 4, "a"),
            Input(Classify, 2, "c1"),
            Input(Embed, 3, "b"),
            Input(Embed, 5, "too big now"),
            Input(Embed, 3, "d"),
        ]);
        let (task, call) = take_call(&mut waiting, 10).unwrap();
        assert_eq!(task, Embed);
        // 4 + 3 + 3 = 10 fits exactly; the 5 would make 12.
        assert_eq!(names(&call), ["a", "b", "d"]);
        assert_eq!(names(waiting.make_contiguous()), ["c1", "too big now"]);
        // The other task's input is now the oldest: its call comes next.
        let (task, call) = take_call(&mut waiting, 10).unwrap();
        assert_eq!((task, names(&call)), (Classify, vec!["c1"]));
        let (task, call) = take_call(&mut waiting, 10).unwrap();
        assert_eq!((task, names(&call)), (Embed, vec!["too big now"]));
        assert!(waiting.is_empty());
    }

    #[test]
    fn the_oldest_goes_even_alone_over_the_budget() {
        let mut waiting = VecDeque::from([Input(Classify, 20, "huge"), Input(Classify, 1, "x")]);
        let (_, call) = take_call(&mut waiting, 10).unwrap();
        assert_eq!(names(&call), ["huge"]);
        assert_eq!(names(waiting.make_contiguous()), ["x"]);
    }
}
