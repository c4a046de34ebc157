//! Adapter exchange policy (pure, no I/O): given a snapshot of the tracked adapters, decide which
//! waiting adapters get a device slot and which active ones give theirs up.
//!
//! - At most `max_active_adapters` adapters occupy a slot (loading, active or offloading), and
//!   their memory fractions (as the shard reported them) sum to at most 1.
//! - Waiting adapters are served in the order they started waiting (FIFO): an adapter offloaded
//!   to make room waits behind those already waiting, so the exchange rotates and no adapter
//!   starves.
//! - A slot is freed for a waiter by, in order: an idle active adapter (nothing queued, nothing
//!   running; least recently used first), else an active adapter that has held its slot for at
//!   least `cycle_time` (the longest-held first): it is *drained* — it admits no new requests and
//!   is offloaded once nothing of it runs. Pinned adapters are never chosen, nor is an adapter
//!   none of whose requests was admitted since it became active (so every activation serves at
//!   least one batch: no ping-pong without progress).
//! - One slot is freed per waiter that needs one: slots already being freed count.

use std::collections::HashSet;
use std::time::Duration;
use tokio::time::Instant;

/// Where an adapter stands, as far as slots are concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Downloaded and wanting a slot (requests queued, a load asked for, or pinned).
    Waiting {
        since: Instant,
    },
    Loading,
    Active {
        since: Instant,
        draining: bool,
    },
    Offloading,
    /// Neither holding nor wanting a slot (downloading, or downloaded and unused).
    Idle,
}

impl Phase {
    fn occupies_slot(self) -> bool {
        matches!(self, Self::Loading | Self::Active { .. } | Self::Offloading)
    }
}

/// One tracked adapter, as the policy sees it.
#[derive(Debug, Clone)]
pub struct SlotView {
    pub index: u32,
    pub phase: Phase,
    pub pinned: bool,
    /// Requests waiting in its queue.
    pub queued: usize,
    /// Requests of it in the running batch.
    pub running: usize,
    /// Last time one of its requests was admitted or ran.
    pub last_used: Instant,
    /// Some request of it was admitted since it became active.
    pub served: bool,
    /// Share of the adapter memory budget it takes on the device (0 when unknown).
    pub memory_fraction: f32,
}

#[derive(Debug, Clone, Copy)]
pub struct ExchangeConfig {
    pub max_active_adapters: usize,
    pub cycle_time: Duration,
}

/// What to do now; every list holds adapter indices.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Waiting adapters to load, in order.
    pub load: Vec<u32>,
    /// Active adapters to offload (idle ones, or drained ones with nothing running).
    pub offload: Vec<u32>,
    /// Active adapters that stop admitting requests.
    pub drain: Vec<u32>,
    /// Draining adapters that may admit again (nobody waits for their slot any more).
    pub undrain: Vec<u32>,
}

/// Memory fractions are estimates: allow a little rounding.
pub const MEMORY_SLACK: f32 = 1e-3;

/// The policy's decision for this snapshot.
pub fn plan(views: &[SlotView], config: &ExchangeConfig, now: Instant) -> Plan {
    let mut plan = Plan::default();
    let mut occupied = views.iter().filter(|v| v.phase.occupies_slot()).count();
    let mut memory: f32 = views
        .iter()
        .filter(|v| v.phase.occupies_slot())
        .map(|v| v.memory_fraction)
        .sum();
    let draining = |v: &SlotView| matches!(v.phase, Phase::Active { draining: true, .. });
    let mut freeing = views
        .iter()
        .filter(|v| v.phase == Phase::Offloading || draining(v))
        .count();
    let mut taken: HashSet<u32> = HashSet::new();
    let mut unplaced = 0;
    for waiter in waiting_order(views) {
        let fits = occupied == 0 || memory + waiter.memory_fraction <= 1.0 + MEMORY_SLACK;
        if occupied < config.max_active_adapters && fits {
            plan.load.push(waiter.index);
            occupied += 1;
            memory += waiter.memory_fraction;
            continue;
        }
        unplaced += 1;
        if freeing >= unplaced {
            continue;
        }
        if let Some(victim) = idle_victim(views, &taken) {
            plan.offload.push(victim.index);
            taken.insert(victim.index);
            freeing += 1;
        } else if let Some(victim) = drain_victim(views, &taken, config.cycle_time, now) {
            plan.drain.push(victim.index);
            taken.insert(victim.index);
            freeing += 1;
        }
    }
    for v in views.iter().filter(|v| draining(v)) {
        if unplaced == 0 {
            plan.undrain.push(v.index);
        } else if v.running == 0 {
            plan.offload.push(v.index);
        }
    }
    for &index in &plan.drain {
        let idle = views.iter().any(|v| v.index == index && v.running == 0);
        if idle {
            plan.offload.push(index);
        }
    }
    plan
}

/// Waiting adapters, longest waiting first.
pub fn waiting_order(views: &[SlotView]) -> Vec<&SlotView> {
    let mut waiting: Vec<(Instant, &SlotView)> = views
        .iter()
        .filter_map(|v| match v.phase {
            Phase::Waiting { since } => Some((since, v)),
            _ => None,
        })
        .collect();
    waiting.sort_by_key(|(since, v)| (*since, v.index));
    waiting.into_iter().map(|(_, v)| v).collect()
}

/// The least recently used active adapter with nothing queued or running, not pinned.
pub fn idle_victim<'a>(views: &'a [SlotView], taken: &HashSet<u32>) -> Option<&'a SlotView> {
    views
        .iter()
        .filter(|v| {
            matches!(
                v.phase,
                Phase::Active {
                    draining: false,
                    ..
                }
            )
        })
        .filter(|v| !v.pinned && v.queued == 0 && v.running == 0 && !taken.contains(&v.index))
        .min_by_key(|v| (v.last_used, v.index))
}

/// The active adapter that has held its slot longest, if that is at least `cycle_time`.
pub fn drain_victim<'a>(
    views: &'a [SlotView],
    taken: &HashSet<u32>,
    cycle_time: Duration,
    now: Instant,
) -> Option<&'a SlotView> {
    views
        .iter()
        .filter_map(|v| match v.phase {
            Phase::Active {
                since,
                draining: false,
            } if !v.pinned
                && v.served
                && !taken.contains(&v.index)
                && now.saturating_duration_since(since) >= cycle_time =>
            {
                Some((since, v))
            }
            _ => None,
        })
        .min_by_key(|(since, v)| (*since, v.index))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CYCLE: Duration = Duration::from_secs(2);

    fn config(max: usize) -> ExchangeConfig {
        ExchangeConfig {
            max_active_adapters: max,
            cycle_time: CYCLE,
        }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn view(index: u32, phase: Phase, t0: Instant) -> SlotView {
        SlotView {
            index,
            phase,
            pinned: false,
            queued: 0,
            running: 0,
            last_used: t0,
            served: true,
            memory_fraction: 0.0,
        }
    }

    fn waiting(index: u32, t0: Instant, ms: u64) -> SlotView {
        let mut v = view(index, Phase::Waiting { since: at(t0, ms) }, t0);
        v.queued = 1;
        v
    }

    fn active(index: u32, t0: Instant, since_ms: u64, queued: usize, running: usize) -> SlotView {
        let phase = Phase::Active {
            since: at(t0, since_ms),
            draining: false,
        };
        SlotView {
            queued,
            running,
            ..view(index, phase, t0)
        }
    }

    #[test]
    fn free_slots_go_to_the_longest_waiting() {
        let t0 = Instant::now();
        let views = [waiting(3, t0, 30), waiting(1, t0, 10), waiting(2, t0, 20)];
        let p = plan(&views, &config(2), at(t0, 100));
        assert_eq!(p.load, vec![1, 2]);
        assert!(p.offload.is_empty() && p.drain.is_empty());
    }

    #[test]
    fn idle_adapters_are_evicted_least_recently_used_first() {
        let t0 = Instant::now();
        let mut a = active(1, t0, 0, 0, 0);
        a.last_used = at(t0, 50);
        let mut b = active(2, t0, 0, 0, 0);
        b.last_used = at(t0, 40);
        let busy = active(3, t0, 0, 2, 1);
        let views = [a, b, busy, waiting(4, t0, 60)];
        let p = plan(&views, &config(3), at(t0, 100));
        assert_eq!(p.offload, vec![2]);
        assert!(p.load.is_empty());
        // Once the evicted slot is being freed, the same waiter frees nothing more.
        let mut views = views.to_vec();
        views[1].phase = Phase::Offloading;
        let p = plan(&views, &config(3), at(t0, 110));
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn busy_adapters_are_drained_only_after_the_cycle_time() {
        let t0 = Instant::now();
        let views = [
            active(1, t0, 0, 5, 2),
            active(2, t0, 500, 5, 2),
            waiting(3, t0, 100),
        ];
        assert_eq!(plan(&views, &config(2), at(t0, 1999)), Plan::default());
        let p = plan(&views, &config(2), at(t0, 2000));
        assert_eq!(p.drain, vec![1]);
        assert!(p.offload.is_empty(), "requests still run: no offload yet");
        // Drained with nothing running left: offloaded; the other is not drained too.
        let mut views = views.to_vec();
        views[0].phase = Phase::Active {
            since: t0,
            draining: true,
        };
        views[0].running = 0;
        let p = plan(&views, &config(2), at(t0, 3000));
        assert_eq!(p.offload, vec![1]);
        assert!(p.drain.is_empty());
    }

    #[test]
    fn an_adapter_is_drained_only_after_serving_once() {
        let t0 = Instant::now();
        let mut fresh = active(1, t0, 0, 3, 0);
        fresh.served = false;
        let views = [fresh, waiting(2, t0, 10)];
        assert_eq!(plan(&views, &config(1), at(t0, 5000)), Plan::default());
    }

    #[test]
    fn a_drained_adapter_with_nothing_running_is_offloaded_at_once() {
        let t0 = Instant::now();
        let views = [active(1, t0, 0, 3, 0), waiting(2, t0, 10)];
        let p = plan(&views, &config(1), at(t0, 2500));
        assert_eq!(p.drain, vec![1]);
        assert_eq!(p.offload, vec![1]);
    }

    #[test]
    fn draining_stops_when_nobody_waits() {
        let t0 = Instant::now();
        let mut a = active(1, t0, 0, 3, 1);
        a.phase = Phase::Active {
            since: t0,
            draining: true,
        };
        let p = plan(&[a], &config(1), at(t0, 3000));
        assert_eq!(p.undrain, vec![1]);
        assert!(p.offload.is_empty());
    }

    #[test]
    fn pinned_adapters_are_never_victims() {
        let t0 = Instant::now();
        let mut idle = active(1, t0, 0, 0, 0);
        idle.pinned = true;
        let mut busy = active(2, t0, 0, 4, 1);
        busy.pinned = true;
        let views = [idle, busy, waiting(3, t0, 10)];
        assert_eq!(plan(&views, &config(2), at(t0, 60_000)), Plan::default());
    }

    #[test]
    fn one_victim_per_waiter() {
        let t0 = Instant::now();
        let views = [
            active(1, t0, 0, 0, 0),
            active(2, t0, 0, 0, 0),
            active(3, t0, 0, 0, 0),
            waiting(4, t0, 10),
            waiting(5, t0, 20),
        ];
        let p = plan(&views, &config(3), at(t0, 100));
        assert_eq!(p.offload.len(), 2);
    }

    #[test]
    fn memory_budget_limits_active_adapters() {
        let t0 = Instant::now();
        let mut a = active(1, t0, 0, 0, 0);
        a.memory_fraction = 0.7;
        let mut w = waiting(2, t0, 10);
        w.memory_fraction = 0.4;
        let p = plan(&[a.clone(), w.clone()], &config(4), at(t0, 100));
        assert!(p.load.is_empty());
        assert_eq!(p.offload, vec![1]);
        // Alone, even an adapter over the budget is tried (the shard has the last word).
        w.memory_fraction = 1.5;
        let p = plan(&[w], &config(4), at(t0, 100));
        assert_eq!(p.load, vec![2]);
    }

    #[test]
    fn waiting_order_is_fifo_with_index_ties() {
        let t0 = Instant::now();
        let views = [waiting(2, t0, 5), waiting(1, t0, 5), waiting(0, t0, 1)];
        let order: Vec<u32> = waiting_order(&views).iter().map(|v| v.index).collect();
        assert_eq!(order, vec![0, 1, 2]);
    }
}
