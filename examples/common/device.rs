//! `--device` of the examples: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#![allow(dead_code)]

use candle_core::{bail, Device, Result};

/// Parses a device name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::new_cuda(i),
            _ => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
        },
    }
}
