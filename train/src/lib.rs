//! `train`: trains EMMA. The default job trains the `tiny` preset on easy-VQA and reports its
//! test accuracy per question type; the same loop takes LLaVA-format
//! data and the paper's presets, runs R data-parallel ranks with a sharded optimizer, and
//! resumes a killed run exactly from its last checkpoint.

pub mod checkpoint;
pub mod collate;
pub mod collective;
pub mod data;
pub mod device_collective;
pub mod easy_vqa;
pub mod error;
pub mod eval;
pub mod flat_layout;
pub mod launch;
pub mod loss_plot;
pub mod metrics;
pub mod options;
pub mod overlapped_reduction;
pub mod plan;
pub mod process_group;
pub mod rendezvous;
pub mod replaced;
pub mod schedule;
pub mod shapes;
pub mod trainer;
pub mod vision_warmup;
pub mod watchdog;
pub mod zero;
