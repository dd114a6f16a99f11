//! `--device cpu|cuda[:N]|metal[:N]`.

use candle_core::Device;

use crate::{Error, Result};

/// Parses a device spec; CUDA and Metal need the matching cargo feature.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => {
            let i: usize = i
                .parse()
                .map_err(|_| Error::InvalidArgument(format!("bad device index in `{spec}`")))?;
            (k.to_string(), i)
        }
        None => (spec.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(index).map_err(|e| {
            Error::InvalidArgument(format!(
                "device `{spec}`: {e} (built with --features cuda?)"
            ))
        }),
        "metal" => Device::new_metal(index).map_err(|e| {
            Error::InvalidArgument(format!(
                "device `{spec}`: {e} (built with --features metal?)"
            ))
        }),
        _ => Err(Error::InvalidArgument(format!(
            "unknown device `{spec}` (cpu, cuda[:N], metal[:N])"
        ))),
    }
}
