//! `--device cpu|cuda[:N]|metal[:N]`: a typed device name, checked when a config is built and
//! opened (which needs the matching cargo feature) only when a model is loaded.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl DeviceSpec {
    /// Opens the device; CUDA and Metal need the matching cargo feature.
    pub fn open(self) -> Result<Device> {
        let unavailable = |e: candle_core::Error, feature: &str| {
            Error::InvalidArgument(format!(
                "device `{self}`: {e} (built with --features {feature}?)"
            ))
        };
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(i) => Device::new_cuda(i).map_err(|e| unavailable(e, "cuda")),
            Self::Metal(i) => Device::new_metal(i).map_err(|e| unavailable(e, "metal")),
        }
    }

    /// The name of an open device.
    pub fn of(device: &Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cpu => Self::Cpu,
            candle_core::DeviceLocation::Cuda { gpu_id } => Self::Cuda(gpu_id),
            candle_core::DeviceLocation::Metal { gpu_id } => Self::Metal(gpu_id),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        let spec = spec.trim().to_ascii_lowercase();
        let (kind, index) = match spec.split_once(':') {
            Some((k, i)) => {
                let i: usize = i
                    .parse()
                    .map_err(|_| Error::InvalidArgument(format!("bad device index in `{spec}`")))?;
                (k, i)
            }
            None => (spec.as_str(), 0),
        };
        match kind {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(index)),
            "metal" => Ok(Self::Metal(index)),
            _ => Err(Error::InvalidArgument(format!(
                "unknown device `{spec}` (cpu, cuda[:N], metal[:N])"
            ))),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

/// Parses and opens a device spec in one step.
pub fn parse_device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>()?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal(0));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
