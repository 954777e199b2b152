//! The part of rayon's API the fast CPU path uses, run on the calling thread: a
//! browser page has no thread pool, and `cpu::fast` stays the same code there.

/// One thread: the caller.
pub(crate) fn current_num_threads() -> usize {
    1
}

/// A scope whose spawned work runs at once, on the calling thread.
pub(crate) struct Scope;

impl Scope {
    pub(crate) fn spawn(&self, work: impl FnOnce(&Scope)) {
        work(self)
    }
}

/// Runs `f` with a [`Scope`].
pub(crate) fn in_place_scope<R>(f: impl FnOnce(&Scope) -> R) -> R {
    f(&Scope)
}
