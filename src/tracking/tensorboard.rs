//! TensorBoard event-file writer: TFRecord framing around hand-derived protobuf messages, so
//! peft-wit needs neither TensorFlow nor protoc. Field numbers follow tensorboard's
//! compat/proto event.proto, summary.proto and tensor.proto.

use super::TrackingError;
use prost::Message;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The subset of TensorBoard's protos that scalars and a text summary need.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "What", tags = "3, 5, 7")]
        pub what: Option<What>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(Summary),
        #[prost(message, tag = "7")]
        SessionLog(SessionLog),
    }

    /// Only `status = START` is used: it tells TensorBoard to drop older points at or after
    /// this event's step (the ones a resumed run is about to log again).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        #[prost(int32, tag = "1")]
        pub status: i32,
    }

    pub const SESSION_LOG_START: i32 = 1;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    /// `Summary.Value`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<SummaryMetadata>,
        #[prost(oneof = "Kind", tags = "2, 8")]
        pub kind: Option<Kind>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        #[prost(message, tag = "8")]
        Tensor(TensorProto),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryMetadata {
        #[prost(message, optional, tag = "1")]
        pub plugin_data: Option<PluginData>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }

    /// A scalar tensor (no `tensor_shape` means shape `[]`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int32, tag = "1")]
        pub dtype: i32,
        #[prost(bytes = "vec", repeated, tag = "8")]
        pub string_val: Vec<Vec<u8>>,
    }

    pub const DT_STRING: i32 = 7;
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that CRCs of CRCs stay well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    // (crc >> 15) | (crc << 17)
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `u64 len | u32 masked_crc(len) | data | u32 masked_crc(data)`, all little-endian.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut rec = Vec::with_capacity(data.len() + 16);
    rec.extend_from_slice(&len);
    rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    rec.extend_from_slice(data);
    rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    rec
}

/// Distinguishes several writers opened by one process within the same second.
static FILE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One `events.out.tfevents.*` file. Each event is one `write_all` on an unbuffered file,
/// so a crash never loses an event that a log call has returned from.
pub struct EventWriter {
    file: File,
    path: PathBuf,
    /// The directory already held event files: a resumed run. The first scalar event is then
    /// preceded by a SessionLog START so TensorBoard drops the old file's orphaned points.
    resumed: bool,
}

impl EventWriter {
    /// Creates `dir` and a new event file in it. A resumed run gets a new file next to the old
    /// ones; TensorBoard reads them in name (= time) order.
    pub fn create(dir: &Path) -> Result<EventWriter, TrackingError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrackingError::TensorboardIo { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let resumed = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents.")
            });
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (host, pid) = (crate::fsutil::hostname(), std::process::id());
        let (file, path) = loop {
            let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(
                "events.out.tfevents.{:010}.{host}.{pid}.{n}",
                now.as_secs()
            ));
            // create_new: never clobber a file of another process that had our pid.
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => continue,
                Err(e) => return Err(io_err(&path)(e)),
            }
        };
        let mut w = EventWriter {
            file,
            path,
            resumed,
        };
        let version = proto::What::FileVersion("brain.Event:2".into());
        w.write_events(&[event(0, now.as_secs_f64(), version)])
            .map_err(io_err(&w.path))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding every value (as f32, TensorBoard's scalar type) at `step`.
    pub fn write_scalars(
        &mut self,
        step: u64,
        wall_time: f64,
        values: &[(&str, f64)],
    ) -> io::Result<()> {
        let value = values
            .iter()
            .map(|&(tag, v)| proto::Value {
                tag: tag.to_string(),
                metadata: None,
                kind: Some(proto::Kind::SimpleValue(v as f32)),
            })
            .collect();
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let mut events = Vec::with_capacity(2);
        if std::mem::take(&mut self.resumed) {
            let start = proto::SessionLog {
                status: proto::SESSION_LOG_START,
            };
            events.push(event(step, wall_time, proto::What::SessionLog(start)));
        }
        events.push(event(step, wall_time, summary(value)));
        self.write_events(&events)
    }

    /// Params as one markdown table in the Text tab (tag "params", step 0).
    pub fn write_params(&mut self, params: &[(String, String)]) -> io::Result<()> {
        if params.is_empty() {
            return Ok(());
        }
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        let mut md = String::from("| param | value |\n|---|---|\n");
        for (k, v) in params {
            md.push_str(&format!("| {} | {} |\n", cell(k), cell(v)));
        }
        let value = proto::Value {
            tag: "params".into(),
            metadata: Some(proto::SummaryMetadata {
                plugin_data: Some(proto::PluginData {
                    plugin_name: "text".into(),
                    content: Vec::new(),
                }),
            }),
            kind: Some(proto::Kind::Tensor(proto::TensorProto {
                dtype: proto::DT_STRING,
                string_val: vec![md.into_bytes()],
            })),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.write_events(&[event(0, now.as_secs_f64(), summary(vec![value]))])
    }

    fn write_events(&mut self, events: &[proto::Event]) -> io::Result<()> {
        let bytes: Vec<u8> = events
            .iter()
            .flat_map(|e| frame_record(&e.encode_to_vec()))
            .collect();
        self.file.write_all(&bytes)?;
        self.file.flush()
    }
}

fn event(step: i64, wall_time: f64, what: proto::What) -> proto::Event {
    proto::Event {
        wall_time,
        step,
        what: Some(what),
    }
}

fn summary(value: Vec<proto::Value>) -> proto::What {
    proto::What::Summary(proto::Summary { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_known_values() {
        // CRC-32C check value (RFC 3720 / iSCSI): "123456789" -> 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // Masked values computed with tensorboard.compat.tensorflow_stub.pywrap_tensorflow
        // .masked_crc32c (tensorboard 2.21.0).
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(b"abc"), 0x21f1_576e);
        assert_eq!(masked_crc32c(&8u64.to_le_bytes()), 0x0f24_86ff);
    }

    #[test]
    fn event_round_trips_through_prost() {
        let ev = proto::Event {
            wall_time: 1.5,
            step: 42,
            what: Some(proto::What::Summary(proto::Summary {
                value: vec![proto::Value {
                    tag: "train/loss".into(),
                    metadata: None,
                    kind: Some(proto::Kind::SimpleValue(0.25)),
                }],
            })),
        };
        let bytes = ev.encode_to_vec();
        // wall_time: field 1, wire type 1 (fixed64) -> key 0x09; step: field 2 varint -> 0x10 42.
        assert_eq!(
            &bytes[..11],
            &[0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f, 0x10, 42]
        );
        assert_eq!(bytes[11], 0x2a); // summary: field 5, length-delimited
        assert_eq!(proto::Event::decode(bytes.as_slice()).unwrap(), ev);
    }

    #[test]
    fn frame_has_tfrecord_layout() {
        let rec = frame_record(b"abc");
        assert_eq!(rec.len(), 3 + 16);
        assert_eq!(&rec[..8], &3u64.to_le_bytes());
        assert_eq!(
            &rec[8..12],
            &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&rec[12..15], b"abc");
        assert_eq!(&rec[15..], &masked_crc32c(b"abc").to_le_bytes());
    }
}
