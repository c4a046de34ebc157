//! The management commands on tracked adapters (`/adapters` load, pin, unload) and the chat
//! template wait: each answers through its waiter, now or when the adapter gets there.

use super::{AdapterRegistry, TemplateWaiter, Tracked, Waiter};
use crate::adapter::{AdapterKey, AdapterRequest};
use crate::api::{AdapterState, AdapterStatus};
use crate::errors::AdapterCommandError;
use crate::registry::Action;
use tokio::time::Instant;

impl AdapterRegistry {
    /// Activates an adapter (downloading it first when needed); `waiter` hears when it is
    /// active or has failed.
    pub fn load(&mut self, request: &AdapterRequest, pin: bool, waiter: Waiter, now: Instant) {
        let index = self.track(request, now);
        if pin {
            if let Err(err) = self.check_pin_limit(index) {
                let _ = waiter.send(Err(err));
                return;
            }
        }
        let Some(a) = self.adapters.get_mut(&index) else {
            return;
        };
        a.pinned |= pin;
        if a.state == AdapterState::Active {
            let _ = waiter.send(Ok(a.status(now)));
        } else {
            a.load_waiters.push(waiter);
        }
    }

    /// `waiter` hears the adapter's own chat template as soon as it is downloaded (downloading it
    /// when it is not tracked yet), or why the download failed.
    pub fn chat_template(
        &mut self,
        request: &AdapterRequest,
        waiter: TemplateWaiter,
        now: Instant,
    ) {
        let index = self.track(request, now);
        let Some(a) = self.adapters.get_mut(&index) else {
            return;
        };
        if a.fetched() {
            let _ = waiter.send(Ok(a.chat_template.clone()));
        } else {
            a.template_waiters.push(waiter);
        }
    }

    /// At most `max_active_adapters - 1` pinned adapters, so one slot always rotates.
    fn check_pin_limit(&self, index: u32) -> Result<(), AdapterCommandError> {
        let pinned = self
            .adapters
            .values()
            .filter(|a| a.pinned && a.index != index)
            .count();
        let limit = self.config.max_active_adapters.saturating_sub(1);
        if pinned >= limit {
            return Err(AdapterCommandError::Conflict(format!(
                "at most {limit} adapter(s) may be pinned with --max-active-adapters {}: one slot \
                 must stay free for other adapters",
                self.config.max_active_adapters
            )));
        }
        Ok(())
    }

    fn find(&mut self, key: &AdapterKey) -> Result<&mut Tracked, AdapterCommandError> {
        let not_found = || {
            AdapterCommandError::NotFound(format!(
                "adapter `{}` ({}) is not tracked",
                key.describe(),
                key.source.as_str()
            ))
        };
        let index = *self.by_key.get(key).ok_or_else(not_found)?;
        self.adapters.get_mut(&index).ok_or_else(not_found)
    }

    /// Pins or unpins a tracked adapter.
    pub fn set_pinned(
        &mut self,
        key: &AdapterKey,
        pinned: bool,
        now: Instant,
    ) -> Result<AdapterStatus, AdapterCommandError> {
        let index = self.find(key)?.index;
        if pinned {
            self.check_pin_limit(index)?;
        }
        let a = self.find(key)?;
        a.pinned = pinned;
        let undrained = pinned && a.draining;
        if undrained {
            a.draining = false;
        }
        let status = a.status(now);
        self.woke |= undrained;
        Ok(status)
    }

    /// Offloads an idle adapter from the device; `waiter` hears when that is done.
    pub fn unload(&mut self, key: &AdapterKey, waiter: Waiter, now: Instant) {
        let a = match self.find(key) {
            Ok(a) => a,
            Err(err) => {
                let _ = waiter.send(Err(err));
                return;
            }
        };
        let conflict = |why: String| Err(AdapterCommandError::Conflict(why));
        let answer = if a.pinned {
            conflict(format!(
                "adapter `{}` is pinned: unpin it first",
                key.describe()
            ))
        } else if !a.queue.is_empty() || a.running > 0 || !a.load_waiters.is_empty() {
            conflict(format!(
                "adapter `{}` is in use: {} queued, {} running request(s)",
                key.describe(),
                a.queue.len(),
                a.running
            ))
        } else {
            match a.state {
                AdapterState::Loading => {
                    conflict(format!("adapter `{}` is being loaded", key.describe()))
                }
                AdapterState::Active => {
                    a.state = AdapterState::Offloading;
                    a.unload_waiters.push(waiter);
                    let action = Action::Offload(a.request.clone(), a.index);
                    self.pending.push(action);
                    return;
                }
                AdapterState::Offloading => {
                    a.unload_waiters.push(waiter);
                    return;
                }
                _ => Ok(a.status(now)),
            }
        };
        let _ = waiter.send(answer);
    }
}
