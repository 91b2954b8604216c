//! Checkpoints in the safetensors format, with parameter names a PyTorch user knows
//! (`conv1.weight`, `fc2.bias`, ...).
//!
//! A checkpoint is a directory `epoch-N/` holding `model.safetensors` (parameters),
//! `optimizer.safetensors` (optimiser state, e.g. `fc1.weight.exp_avg`) and
//! `state.json` (epoch, step, model description). It is written under a temporary name
//! and renamed into place, and `latest` names the newest complete one, so a process
//! killed while writing never leaves a damaged checkpoint behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use strata_tensor::HostTensor;

use crate::{ModelSpec, NnError, Result};

/// Training progress stored with a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: u64,
    /// Optimiser steps taken.
    pub step: u64,
    /// The model.
    pub spec: ModelSpec,
    /// Free-form information (optimiser, seed, data).
    pub info: HashMap<String, String>,
}

/// A checkpoint in memory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Parameters in model order.
    pub params: Vec<(String, HostTensor)>,
    /// Optimiser state.
    pub optimizer: Vec<(String, HostTensor)>,
    /// Progress.
    pub state: TrainState,
}

fn ck_err(path: &Path, message: impl Into<String>) -> NnError {
    NnError::Checkpoint { path: path.to_path_buf(), message: message.into() }
}

fn write_tensors(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| {
            TensorView::new(Dtype::F32, t.shape().dims().to_vec(), bytemuck_bytes(t.data())).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ck_err(path, e.to_string()))?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| ck_err(path, e.to_string()))
}

fn bytemuck_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte view of it is valid to read.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn read_tensors(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let bytes = std::fs::read(path).map_err(|e| ck_err(path, e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ck_err(path, format!("not a safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(ck_err(path, format!("tensor {name} has dtype {:?}, expected F32", view.dtype())));
        }
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        out.push((name, HostTensor::new(view.shape().to_vec(), data).map_err(|e| ck_err(path, e.to_string()))?));
    }
    Ok(out)
}

/// Writes `ck` as `dir/epoch-N` and points `dir/latest` at it.
pub fn save(dir: &Path, ck: &Checkpoint) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| ck_err(dir, e.to_string()))?;
    let name = format!("epoch-{}", ck.state.epoch);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ck_err(&tmp, e.to_string()))?;
    write_tensors(&tmp.join("model.safetensors"), &ck.params)?;
    write_tensors(&tmp.join("optimizer.safetensors"), &ck.optimizer)?;
    let json = serde_json::to_string_pretty(&ck.state).map_err(|e| ck_err(&tmp, e.to_string()))?;
    std::fs::write(tmp.join("state.json"), json).map_err(|e| ck_err(&tmp, e.to_string()))?;
    let final_dir = dir.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| ck_err(&final_dir, e.to_string()))?;
    let latest_tmp = dir.join(".latest.tmp");
    std::fs::write(&latest_tmp, &name).map_err(|e| ck_err(&latest_tmp, e.to_string()))?;
    std::fs::rename(&latest_tmp, dir.join("latest")).map_err(|e| ck_err(dir, e.to_string()))?;
    Ok(final_dir)
}

/// Loads the checkpoint `dir/latest` names; `None` when there is none yet.
pub fn load_latest(dir: &Path) -> Result<Option<Checkpoint>> {
    let latest = dir.join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest).map_err(|e| ck_err(&latest, e.to_string()))?;
    load(&dir.join(name.trim())).map(Some)
}

/// Loads the checkpoint in `path` (an `epoch-N` directory).
pub fn load(path: &Path) -> Result<Checkpoint> {
    let state_path = path.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| ck_err(&state_path, e.to_string()))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| ck_err(&state_path, e.to_string()))?;
    Ok(Checkpoint {
        params: read_tensors(&path.join("model.safetensors"))?,
        optimizer: read_tensors(&path.join("optimizer.safetensors"))?,
        state,
    })
}

impl Checkpoint {
    /// The parameters in `spec`'s order, refusing a checkpoint of another model with the
    /// first parameter that is missing or has another shape.
    pub fn params_for(&self, spec: &ModelSpec, path: &Path) -> Result<Vec<HostTensor>> {
        let mut out = Vec::new();
        for (name, shape) in spec.params() {
            let Some((_, t)) = self.params.iter().find(|(n, _)| *n == name) else {
                return Err(ck_err(path, format!("parameter {name} of model {} is missing", spec.name)));
            };
            if *t.shape() != shape {
                return Err(ck_err(
                    path,
                    format!("parameter {name} has shape {}, model {} expects {shape}", t.shape(), spec.name),
                ));
            }
            out.push(t.clone());
        }
        if let Some((extra, _)) = self.params.iter().find(|(n, _)| !spec.params().iter().any(|(p, _)| p == n)) {
            return Err(ck_err(path, format!("parameter {extra} is not part of model {}", spec.name)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusal_of_another_model() {
        let d = tempfile::tempdir().unwrap();
        let spec = ModelSpec::reference_cnn(1, 28, 28, 10);
        let params: Vec<(String, HostTensor)> =
            spec.params().into_iter().zip(spec.init(1)).map(|((n, _), t)| (n, t)).collect();
        let ck = Checkpoint {
            params: params.clone(),
            optimizer: vec![("fc2.bias.exp_avg".into(), HostTensor::random([10], 2))],
            state: TrainState { epoch: 2, step: 100, spec: spec.clone(), info: HashMap::new() },
        };
        let path = save(d.path(), &ck).unwrap();
        assert!(path.ends_with("epoch-2"));
        let back = load_latest(d.path()).unwrap().unwrap();
        assert_eq!(back.state, ck.state);
        assert_eq!(back.params_for(&spec, &path).unwrap(), spec.init(1));
        assert_eq!(back.optimizer, ck.optimizer);
        let names: Vec<&str> = back.params.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"conv1.weight") && names.contains(&"fc2.bias"));

        let cifar = ModelSpec::reference_cnn(3, 32, 32, 10);
        let e = back.params_for(&cifar, &path).unwrap_err().to_string();
        assert!(
            e.contains("parameter conv1.weight has shape [64,1,3,3], model reference-cnn expects [64,3,3,3]"),
            "{e}"
        );
    }
}
