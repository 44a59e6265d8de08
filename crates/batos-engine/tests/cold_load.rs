//! A request whose adapter is cold loads it on the submitting thread: the step loop
//! keeps serving everyone else meanwhile. The residency here holds the load of "cold"
//! until the test lets it go; a base request submitted after it runs to its end first.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use batos_engine::{
    AdapterInfo, AdapterResidency, AdapterSource, AdapterTicket, Engine, EngineError, FinishReason,
    GenerateRequest, GenerationParams, LeaseId, Prompt, SlotsBusy, StopReason,
};
use batos_model::forward::{ForwardBatch, ForwardOutput, KvCacheMut, LlamaModel};
use batos_types::SlotIdx;
use common::{model, tokens, TestAdapters};

/// [`TestAdapters`] whose `acquire("cold")` waits for a message (a slow cold → warm load).
struct SlowColdLoad {
    inner: Arc<TestAdapters>,
    gate: Mutex<mpsc::Receiver<()>>,
    loading: AtomicBool,
}

impl AdapterResidency for SlowColdLoad {
    fn acquire(&self, name: &str) -> Result<AdapterTicket, EngineError> {
        if name == "cold" {
            self.loading.store(true, Ordering::SeqCst);
            self.gate
                .lock()
                .unwrap()
                .recv()
                .expect("the test releases the load");
            self.loading.store(false, Ordering::SeqCst);
        }
        self.inner.acquire(name)
    }
    fn pin_hot(&self, lease: LeaseId) -> Result<Result<SlotIdx, SlotsBusy>, EngineError> {
        self.inner.pin_hot(lease)
    }
    fn unpin(&self, lease: LeaseId) {
        self.inner.unpin(lease)
    }
    fn release(&self, lease: LeaseId) {
        self.inner.release(lease)
    }
    fn forward(
        &self,
        model: &LlamaModel,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
    ) -> Result<ForwardOutput, EngineError> {
        self.inner.forward(model, batch, cache)
    }
    fn load(&self, name: &str, source: &AdapterSource) -> Result<AdapterInfo, EngineError> {
        self.inner.load(name, source)
    }
    fn replace(&self, name: &str, source: &AdapterSource) -> Result<AdapterInfo, EngineError> {
        self.inner.replace(name, source)
    }
    fn unload(&self, name: &str) -> Result<(), EngineError> {
        self.inner.unload(name)
    }
    fn list(&self) -> Result<Vec<AdapterInfo>, EngineError> {
        self.inner.list()
    }
    fn hot_slots(&self) -> usize {
        self.inner.hot_slots()
    }
}

#[test]
fn a_cold_adapter_load_does_not_stall_other_requests() {
    let m = model();
    let vocab = m.dims().vocab_size;
    let (release, gate) = mpsc::channel();
    let residency = Arc::new(SlowColdLoad {
        inner: TestAdapters::new(&["cold"], 2),
        gate: Mutex::new(gate),
        loading: AtomicBool::new(false),
    });
    let engine = Arc::new(
        Engine::builder()
            .runtime_model(m, None)
            .kv_pool_blocks(64)
            .block_size(16)
            .max_num_seqs(4)
            .adapters(residency.clone())
            .build()
            .unwrap(),
    );
    let params = || GenerationParams::greedy(12);

    // The cold request blocks in its submitting thread until released.
    let cold = {
        let engine = engine.clone();
        let prompt = tokens(7, 1, vocab);
        thread::spawn(move || {
            let req = GenerateRequest::new(Prompt::Tokens(prompt), params()).with_adapter("cold");
            engine.generate(req).map(|s| s.wait())
        })
    };
    while !residency.loading.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(1));
    }

    // A base request submitted meanwhile runs to its end while the load is held (the
    // timeout only turns a stall into a failure instead of a hung test).
    let (done, finished) = mpsc::channel();
    {
        let engine = engine.clone();
        let prompt = tokens(5, 2, vocab);
        thread::spawn(move || {
            let req = GenerateRequest::new(Prompt::Tokens(prompt), params());
            let _ = done.send(engine.generate(req).map(|s| s.wait()));
        });
    }
    let base = finished
        .recv_timeout(Duration::from_secs(120))
        .expect("the base request stalled behind the cold adapter's load")
        .unwrap();
    assert_eq!(base.tokens.len(), 12);
    assert!(matches!(
        base.reason,
        StopReason::Finished(FinishReason::Length)
    ));
    assert!(
        residency.loading.load(Ordering::SeqCst),
        "the cold load was still held while the base request finished"
    );

    release.send(()).unwrap();
    let cold = cold.join().unwrap().unwrap();
    assert_eq!(cold.tokens.len(), 12);
}
