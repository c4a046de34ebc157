//! What the fake shard generates: one deterministic token per step per request (its text names
//! the request, the step and the adapter), EOS on the second step of prompts with "stop".

use super::{EOS_ID, STOP_WORD_ID};
use crate::entry::round_up;
use crate::pb;

#[derive(Debug, Clone)]
pub(super) struct FakeRequest {
    pub request: pb::Request,
    /// The adapter installed at its index when it was prefilled.
    pub adapter: Option<String>,
    pub generated: u32,
    pub finished: bool,
}

/// One generation step for one request.
pub(super) fn step(request: &mut FakeRequest, violations: &mut Vec<String>) -> pb::Generation {
    let r = &request.request;
    if request.finished {
        violations.push(format!("request {} stepped after it finished", r.id));
    }
    request.generated += 1;
    let k = request.generated;
    let stop = r.stopping_parameters.clone().unwrap_or_default();
    let eos = r.input_ids.contains(&STOP_WORD_ID) && !stop.ignore_eos_token && k == 2;
    let suffix = request
        .adapter
        .as_ref()
        .map(|a| format!("[{a}]"))
        .unwrap_or_default();
    let (token_id, token_text) = if eos {
        (EOS_ID, "</s>".to_string())
    } else {
        (r.id as u32 * 100 + k, format!(" r{}t{}{suffix}", r.id, k))
    };
    let finish = if eos {
        Some(pb::FinishReason::EosToken)
    } else if k >= stop.max_new_tokens {
        Some(pb::FinishReason::Length)
    } else {
        None
    };
    request.finished = finish.is_some();
    let params = r.parameters.unwrap_or_default();
    let generated_text = finish.map(|reason| pb::GeneratedText {
        text: (1..=k)
            .filter(|i| !(eos && *i == k))
            .map(|i| format!(" r{}t{}{suffix}", r.id, i))
            .collect(),
        generated_tokens: k,
        finish_reason: reason as i32,
        seed: params.do_sample.then_some(params.seed),
    });
    let prefill_tokens = (k == 1 && r.prefill_logprobs).then(|| pb::Tokens {
        ids: r.input_ids.clone(),
        logprobs: (0..r.input_ids.len())
            .map(|i| if i == 0 { f32::NAN } else { -1.0 })
            .collect(),
        texts: r.input_ids.iter().map(|id| format!("w{id}")).collect(),
        is_special: r.input_ids.iter().map(|id| *id <= EOS_ID).collect(),
    });
    let n = r.top_n_tokens;
    let top_tokens = (n > 0).then(|| pb::Tokens {
        ids: (0..n).map(|j| token_id + j).collect(),
        logprobs: (0..n).map(|j| -(j as f32) - 0.5).collect(),
        texts: (0..n).map(|j| format!("alt{j}")).collect(),
        is_special: vec![false; n as usize],
    });
    // Sampled requests get a seed-dependent log-probability, so best_of has something to rank.
    let logprob = if params.do_sample {
        -((params.seed % 7) as f32) - 0.25
    } else {
        -0.5
    };
    pb::Generation {
        request_id: r.id,
        prefill_tokens,
        token_id,
        token_logprob: logprob,
        token_text,
        token_is_special: eos,
        generated_text,
        top_tokens,
        skipped: false,
    }
}

pub(super) fn cached(
    id: u64,
    requests: &[FakeRequest],
    block_size: u32,
) -> Option<pb::CachedBatch> {
    if requests.iter().all(|r| r.finished) {
        return None;
    }
    Some(pb::CachedBatch {
        id,
        request_ids: requests.iter().map(|r| r.request.id).collect(),
        size: requests.len() as u32,
        max_tokens: requests
            .iter()
            .map(|r| {
                let stop = r.request.stopping_parameters.as_ref().unwrap();
                round_up(
                    r.request.input_ids.len() as u32 + stop.max_new_tokens,
                    block_size,
                )
            })
            .sum(),
    })
}
