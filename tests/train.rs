//! Smoke test of `examples/train.rs`: a short training run on candle-mha must reduce the loss.

#[path = "../examples/train.rs"]
#[allow(dead_code)]
mod train_example;

use candle_core::Device;
use train_example::{make_batch, train, Rng, TrainConfig};

#[test]
fn short_training_run_reduces_the_loss() {
    let cfg = TrainConfig {
        steps: 60,
        batch: 32,
        progress: false,
        ..TrainConfig::default()
    };
    let report = train(&cfg, &Device::Cpu).unwrap();
    // Trained through the fused kernel both ways (its backward is the fused backward).
    assert_eq!(report.model.attention_kernel(), "cpu");
    assert!(report.first_loss.is_finite() && report.last_loss.is_finite());
    assert!(
        report.last_loss < 0.6 * report.first_loss,
        "loss {} -> {} after {} steps",
        report.first_loss,
        report.last_loss,
        cfg.steps
    );
    // The trained model decodes a held-out batch without error and beats chance (10%).
    let batch = make_batch(&mut Rng::new(99), 32, &Device::Cpu).unwrap();
    let eval = train_example::evaluate(&report.model, &batch).unwrap();
    assert!(eval.digits > 0.2, "digit accuracy {}", eval.digits);
}
