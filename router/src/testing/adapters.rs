//! The fake shard's adapters: Download/Load/Offload with per-adapter delays, failures and
//! private tokens, and the checks a real shard makes (a prefilled request's adapter index must
//! be loaded; an adapter still used by cached requests must not be offloaded). Anything the
//! router should never cause is recorded as a violation.

use crate::client::{DownloadedAdapter, LoadedAdapter, ShardError};
use crate::pb;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tonic::Code;

/// How the fake shard treats one adapter id.
#[derive(Debug, Clone, Default)]
pub struct AdapterBehaviour {
    pub download_delay: Duration,
    pub load_delay: Duration,
    /// Download fails with this status.
    pub error: Option<(Code, String)>,
    /// Load fails with this status (after a successful download).
    pub load_error: Option<(Code, String)>,
    /// Private: downloads need exactly this token (UNAUTHENTICATED without one, PERMISSION_DENIED
    /// with another).
    pub token: Option<String>,
    /// Share of the adapter memory budget (0.1 when unset).
    pub memory_fraction: Option<f32>,
    /// Downloads wait for a permit of this semaphore (a download the test releases).
    pub download_gate: Option<Arc<Semaphore>>,
    /// The adapter ships this chat template (with bos `<s>` and eos `</s>`).
    pub chat_template: Option<String>,
}

/// One prefilled request: its id, adapter index and the adapter installed there at the time.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillRecord {
    pub request_id: u64,
    pub adapter_index: u32,
    pub adapter: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct FakeAdapters {
    pub behaviours: HashMap<String, AdapterBehaviour>,
    /// Adapter names (ids joined by `+`) downloaded, with the token they were fetched with.
    pub downloaded: HashSet<(String, Option<String>)>,
    /// What is installed at each index.
    pub installed: HashMap<u32, String>,
    pub max_installed: usize,
    pub prefills: Vec<PrefillRecord>,
    /// Every token the shard received (to check tokens reach the shard).
    pub tokens_seen: Vec<Option<String>>,
}

/// The name the fake uses for an adapter: ids joined by `+`.
pub fn adapter_name(parameters: &Option<pb::AdapterParameters>) -> String {
    parameters
        .as_ref()
        .map(|p| p.adapter_ids.join("+"))
        .unwrap_or_default()
}

impl FakeAdapters {
    /// Delays of a Download (or Load) of these ids: the longest of them.
    pub fn delay(&self, name: &str, load: bool) -> Duration {
        name.split('+')
            .filter_map(|id| self.behaviours.get(id))
            .map(|b| if load { b.load_delay } else { b.download_delay })
            .max()
            .unwrap_or_default()
    }

    /// The gate the download of these ids waits for, if any.
    pub fn download_gate(&self, name: &str) -> Option<Arc<Semaphore>> {
        name.split('+')
            .find_map(|id| self.behaviours.get(id)?.download_gate.clone())
    }

    /// As the real shard: the share of every id, the chat template of the first that has one.
    pub fn download(
        &mut self,
        name: &str,
        token: Option<String>,
    ) -> Result<DownloadedAdapter, ShardError> {
        self.tokens_seen.push(token.clone());
        for id in name.split('+') {
            let b = self.behaviours.get(id).cloned().unwrap_or_default();
            match (&b.token, &token) {
                (Some(_), None) => {
                    return Err(ShardError::status(
                        Code::Unauthenticated,
                        format!("{id} is private: an api_token is required"),
                    ))
                }
                (Some(needed), Some(given)) if needed != given => {
                    return Err(ShardError::status(
                        Code::PermissionDenied,
                        format!("the token has no access to {id}"),
                    ))
                }
                _ => {}
            }
            if let Some((code, message)) = b.error {
                return Err(ShardError::status(code, message));
            }
        }
        self.downloaded.insert((name.to_string(), token));
        Ok(self.download_answer(name))
    }

    /// What a download of these ids answers: the sum of their shares, the first chat template.
    fn download_answer(&self, name: &str) -> DownloadedAdapter {
        let mut answer = DownloadedAdapter::default();
        for id in name.split('+') {
            let b = self.behaviours.get(id).cloned().unwrap_or_default();
            answer.memory_fraction += b.memory_fraction.unwrap_or(0.1);
            if answer.chat_template.is_none() {
                answer.chat_template = b.chat_template.map(|template| pb::AdapterChatTemplate {
                    template,
                    bos_token: "<s>".into(),
                    eos_token: "</s>".into(),
                });
            }
        }
        answer
    }

    /// As the real shard: installs a downloaded adapter; with `if_fits`, fetches it first when
    /// needed and leaves it out (`loaded: false`) when the installed adapters' shares and its own
    /// would exceed the budget.
    pub fn load(
        &mut self,
        name: &str,
        index: u32,
        token: Option<String>,
        if_fits: bool,
        violations: &mut Vec<String>,
    ) -> Result<LoadedAdapter, ShardError> {
        if index == 0 {
            violations.push(format!("{name} loaded at index 0"));
            return Err(ShardError::status(Code::InvalidArgument, "index 0"));
        }
        let fetched = (name.to_string(), token.clone());
        let downloaded = if if_fits && !self.downloaded.contains(&fetched) {
            self.download(name, token)?
        } else {
            if !self.downloaded.contains(&fetched) {
                violations.push(format!("{name} loaded before it was downloaded"));
            }
            self.tokens_seen.push(token);
            self.download_answer(name)
        };
        let failure = name
            .split('+')
            .find_map(|id| self.behaviours.get(id)?.load_error.clone());
        if let Some((code, message)) = failure {
            return Err(ShardError::status(code, message));
        }
        let others: f32 = self
            .installed
            .iter()
            .filter(|(&i, _)| i != index)
            .map(|(_, installed)| self.download_answer(installed).memory_fraction)
            .sum();
        let loaded = !if_fits || others + downloaded.memory_fraction <= 1.0 + 1e-3;
        if loaded {
            self.installed.insert(index, name.to_string());
            self.max_installed = self.max_installed.max(self.installed.len());
        }
        Ok(LoadedAdapter { loaded, downloaded })
    }

    pub fn offload(
        &mut self,
        name: &str,
        index: u32,
        in_use: bool,
        violations: &mut Vec<String>,
    ) -> Result<bool, ShardError> {
        if in_use {
            violations.push(format!(
                "{name} offloaded from {index} while requests use it"
            ));
            return Err(ShardError::status(
                Code::FailedPrecondition,
                format!("adapter index {index} is used by running requests"),
            ));
        }
        match self.installed.get(&index) {
            Some(installed) if installed != name => {
                violations.push(format!(
                    "offload of {name} at {index}, which holds {installed}"
                ));
                Ok(false)
            }
            Some(_) => {
                self.installed.remove(&index);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Checks a new batch's adapters; records each request. Err when an index is not loaded.
    pub fn prefill(
        &mut self,
        requests: &[pb::Request],
        violations: &mut Vec<String>,
    ) -> Result<Vec<Option<String>>, ShardError> {
        let mut names = Vec::with_capacity(requests.len());
        for r in requests {
            let name = match r.adapter_index {
                0 => None,
                index => match self.installed.get(&index) {
                    Some(name) => Some(name.clone()),
                    None => {
                        violations.push(format!(
                            "request {} prefilled with adapter index {index}, not loaded",
                            r.id
                        ));
                        return Err(ShardError::status(
                            Code::InvalidArgument,
                            format!("adapter index {index} is not loaded"),
                        ));
                    }
                },
            };
            self.prefills.push(PrefillRecord {
                request_id: r.id,
                adapter_index: r.adapter_index,
                adapter: name.clone(),
            });
            names.push(name);
        }
        Ok(names)
    }

    /// Whether `index` still holds `name` (a decoded request's adapter must stay in place).
    pub fn holds(&self, index: u32, name: &Option<String>) -> bool {
        match name {
            None => true,
            Some(name) => self.installed.get(&index) == Some(name),
        }
    }
}
