//! The fake shard's grammars: CompileGrammar refuses a grammar whose value contains
//! `REFUSED_GRAMMAR_MARKER` (INVALID_ARGUMENT with a reason, as a shard answers for a grammar it
//! cannot compile), fails one containing `FAILING_GRAMMAR_MARKER` (UNAVAILABLE: a broken
//! shard), and caches the others. A prefilled request whose grammar was not compiled first is a
//! violation: the router compiles before queueing, so no batch ever waits for a compilation.

use crate::client::ShardError;
use crate::pb;
use std::collections::HashSet;
use tonic::Code;

/// A grammar whose value contains this is refused by `FakeShard::compile_grammar`.
pub const REFUSED_GRAMMAR_MARKER: &str = "refused-by-fake-shard";
/// A grammar whose value contains this makes `FakeShard::compile_grammar` fail as a shard
/// failure (UNAVAILABLE), not a refusal.
pub const FAILING_GRAMMAR_MARKER: &str = "fails-in-fake-shard";

#[derive(Debug, Default)]
pub(super) struct FakeGrammars {
    /// (type, value) of every grammar compiled.
    compiled: HashSet<(i32, String)>,
}

impl FakeGrammars {
    pub fn compile(&mut self, grammar: &pb::Grammar) -> Result<(), ShardError> {
        if grammar.value.contains(REFUSED_GRAMMAR_MARKER) {
            return Err(ShardError::status(
                Code::InvalidArgument,
                format!("cannot compile the grammar: it contains `{REFUSED_GRAMMAR_MARKER}`"),
            ));
        }
        if grammar.value.contains(FAILING_GRAMMAR_MARKER) {
            return Err(ShardError::status(Code::Unavailable, "grammar worker died"));
        }
        self.compiled
            .insert((grammar.r#type, grammar.value.clone()));
        Ok(())
    }

    /// Records a violation for each prefilled request whose grammar was never compiled.
    pub fn check_prefill(&self, requests: &[pb::Request], violations: &mut Vec<String>) {
        for r in requests {
            let Some(g) = r.grammar.as_ref().filter(|g| g.r#type != 0) else {
                continue;
            };
            if !self.compiled.contains(&(g.r#type, g.value.clone())) {
                violations.push(format!(
                    "request {} reached prefill with a grammar that was not compiled",
                    r.id
                ));
            }
        }
    }
}
