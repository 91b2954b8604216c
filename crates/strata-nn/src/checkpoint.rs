//! Checkpoints in the safetensors format, with parameter names a PyTorch user knows
//! (`conv1.weight`, `fc2.bias`, ...).
//!
//! A checkpoint is a directory `epoch-N/` holding `model.safetensors` (parameters),
//! `optimizer.safetensors` (optimiser state, e.g. `fc1.weight.exp_avg`) and
//! `state.json` (epoch, step, model description); `latest` names the newest one.
//!
//! Saving survives a crash or power loss at any instant: the files are written into a
//! temporary directory and fsynced, the directory is renamed into place, and the parent
//! is fsynced after every rename. Re-saving an epoch moves the old directory aside to
//! `.epoch-N.old` (a name the loader also accepts) before the new one takes its place,
//! and removes it only afterwards, so a complete old or new checkpoint exists at every
//! instant. `latest` is replaced the same way (temporary file, fsync, rename).

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

/// A point of [`save_steps`] where a test may stop the save as a crash would.
type Crash<'a> = &'a mut dyn FnMut() -> bool;

fn step(crash: Crash<'_>, dir: &Path) -> Result<()> {
    if crash() { Err(ck_err(dir, "save interrupted (injected crash)")) } else { Ok(()) }
}

/// Writes `bytes` to `path` and fsyncs it; a crash point sits inside the write, so a test
/// sees half-written files too.
fn write_synced(path: &Path, bytes: &[u8], crash: Crash<'_>) -> Result<()> {
    use std::io::Write;
    let err = |e: std::io::Error| ck_err(path, e.to_string());
    let mut f = std::fs::File::create(path).map_err(err)?;
    let half = bytes.len() / 2;
    f.write_all(&bytes[..half]).map_err(err)?;
    step(crash, path)?;
    f.write_all(&bytes[half..]).map_err(err)?;
    f.sync_all().map_err(err)?;
    step(crash, path)
}

/// Fsyncs a directory, making the renames and creations inside it durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ck_err(dir, format!("fsync: {e}")))?;
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| ck_err(to, format!("renaming {} here: {e}", from.display())))
}

fn tensor_bytes(path: &Path, tensors: &[(String, HostTensor)]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(n, t)| {
            TensorView::new(Dtype::F32, t.shape().dims().to_vec(), bytemuck_bytes(t.data())).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ck_err(path, e.to_string()))?;
    safetensors::serialize(views, None).map_err(|e| ck_err(path, e.to_string()))
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

/// The epoch of a checkpoint directory name: `epoch-N`, or `.epoch-N.old` (the previous
/// save of epoch N while a re-save swaps it out). Anything else (`..`, paths) is `None`.
fn parse_name(name: &str) -> Option<(u64, bool)> {
    let (digits, aside) = match name.strip_prefix(".epoch-").and_then(|r| r.strip_suffix(".old")) {
        Some(d) => (d, true),
        None => (name.strip_prefix("epoch-")?, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, aside))
}

/// Writes `ck` as `dir/epoch-N` and points `dir/latest` at it.
pub fn save(dir: &Path, ck: &Checkpoint) -> Result<PathBuf> {
    save_steps(dir, ck, &mut || false)
}

/// [`save`], asking `crash` at every step whether to stop there as a killed process would
/// (tests only ever answer yes).
fn save_steps(dir: &Path, ck: &Checkpoint, crash: Crash<'_>) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| ck_err(dir, e.to_string()))?;
    let name = format!("epoch-{}", ck.state.epoch);
    let tmp = dir.join(format!(".{name}.tmp"));
    let aside = dir.join(format!(".{name}.old"));
    let final_dir = dir.join(&name);
    // A leftover of an interrupted save; the loader never looks at it.
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| ck_err(&tmp, e.to_string()))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| ck_err(&tmp, e.to_string()))?;
    step(crash, dir)?;
    let model = tmp.join("model.safetensors");
    write_synced(&model, &tensor_bytes(&model, &ck.params)?, crash)?;
    let optimizer = tmp.join("optimizer.safetensors");
    write_synced(&optimizer, &tensor_bytes(&optimizer, &ck.optimizer)?, crash)?;
    let json = serde_json::to_string_pretty(&ck.state).map_err(|e| ck_err(&tmp, e.to_string()))?;
    write_synced(&tmp.join("state.json"), json.as_bytes(), crash)?;
    sync_dir(&tmp)?;
    step(crash, dir)?;
    if final_dir.exists() {
        // The previous save of this epoch goes aside, where the loader still finds it;
        // an older aside copy is stale once `final_dir` exists.
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(|e| ck_err(&aside, e.to_string()))?;
            step(crash, dir)?;
        }
        rename(&final_dir, &aside)?;
        sync_dir(dir)?;
        step(crash, dir)?;
    }
    rename(&tmp, &final_dir)?;
    sync_dir(dir)?;
    step(crash, dir)?;
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(|e| ck_err(&aside, e.to_string()))?;
        step(crash, dir)?;
    }
    let latest_tmp = dir.join(".latest.tmp");
    write_synced(&latest_tmp, name.as_bytes(), crash)?;
    rename(&latest_tmp, &dir.join("latest"))?;
    sync_dir(dir)?;
    step(crash, dir)?;
    Ok(final_dir)
}

/// Loads the checkpoint `dir/latest` names; `None` when `dir` holds no checkpoint yet.
///
/// `latest` must name an `epoch-N` directory of `dir` (anything else, such as a path, is
/// refused). When that directory is missing or incomplete (deleted by hand, a damaged
/// disk), the newest complete checkpoint up to epoch N is loaded instead, with a warning:
/// resuming from a slightly older checkpoint is what a user wants rather than losing the
/// run. Without `latest` (a crash before the first pointer was written), the newest
/// complete checkpoint is loaded. Only when none is complete is it an error.
pub fn load_latest(dir: &Path) -> Result<Option<Checkpoint>> {
    let latest = dir.join("latest");
    let newest = match std::fs::read_to_string(&latest) {
        Ok(text) => {
            let name = text.trim();
            let Some((epoch, false)) = parse_name(name) else {
                return Err(ck_err(&latest, format!("names {name:?}, which is not a checkpoint directory epoch-N")));
            };
            Some(epoch)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ck_err(&latest, e.to_string())),
    };
    let mut candidates: Vec<(u64, bool, PathBuf)> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| {
                let e = e.ok()?;
                let (epoch, aside) = parse_name(e.file_name().to_str()?)?;
                Some((epoch, aside, e.path()))
            })
            .filter(|(epoch, _, _)| newest.is_none_or(|n| *epoch <= n))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(ck_err(dir, e.to_string())),
    };
    // Newest first; at one epoch the directory in place before its aside copy.
    candidates.sort_by_key(|(epoch, aside, _)| (std::cmp::Reverse(*epoch), *aside));
    let mut first_error = None;
    for (epoch, _, path) in &candidates {
        match load(path) {
            Ok(ck) => {
                if newest.is_some_and(|n| n != *epoch) || (newest.is_none() && first_error.is_some()) {
                    tracing::warn!(
                        "{} names a missing or incomplete checkpoint; resuming from {} instead",
                        latest.display(),
                        path.display()
                    );
                }
                return Ok(Some(ck));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match (newest, first_error) {
        (_, Some(e)) => Err(e),
        (Some(n), None) => Err(ck_err(&latest, format!("names epoch-{n}, which does not exist"))),
        (None, None) => Ok(None),
    }
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

    fn checkpoint(epoch: u64, seed: u64) -> Checkpoint {
        // 4x4 inputs keep the model (and every save of the crash test) small.
        let spec = ModelSpec::reference_cnn(1, 4, 4, 10);
        let params = spec.params().into_iter().zip(spec.init(seed)).map(|((n, _), t)| (n, t)).collect();
        let mut info = HashMap::new();
        info.insert("seed".into(), seed.to_string());
        Checkpoint {
            params,
            optimizer: vec![("fc2.bias.exp_avg".into(), HostTensor::random([10], seed))],
            state: TrainState { epoch, step: 10 * epoch + seed, spec, info },
        }
    }

    /// A tensor's name, shape and element bits.
    type TensorBits = (String, Vec<usize>, Vec<u32>);

    /// Everything a checkpoint holds, bit for bit (tensors by name: a file keeps no order).
    fn bits(ck: &Checkpoint) -> (Vec<TensorBits>, String) {
        let mut tensors: Vec<_> = ck
            .params
            .iter()
            .chain(&ck.optimizer)
            .map(|(n, t)| (n.clone(), t.shape().dims().to_vec(), t.data().iter().map(|v| v.to_bits()).collect()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        (tensors, serde_json::to_string(&ck.state).unwrap())
    }

    #[test]
    fn a_save_interrupted_at_any_step_leaves_the_old_or_the_new_checkpoint() {
        let old = checkpoint(3, 1);
        // Re-saving the same epoch (a restarted run) and saving the next one.
        for new in [checkpoint(3, 2), checkpoint(4, 2)] {
            let (mut saw_old, mut saw_new) = (false, false);
            let mut k = 0;
            loop {
                let d = tempfile::tempdir().unwrap();
                save(d.path(), &old).unwrap();
                let mut n = 0;
                let crashed = save_steps(d.path(), &new, &mut || {
                    n += 1;
                    n > k
                });
                let loaded = load_latest(d.path())
                    .unwrap_or_else(|e| panic!("crash at step {k}: loading failed: {e}"))
                    .unwrap_or_else(|| panic!("crash at step {k}: no checkpoint found"));
                let got = bits(&loaded);
                if got == bits(&old) {
                    saw_old = true;
                } else {
                    assert!(got == bits(&new), "crash at step {k}: the loaded checkpoint is a mix");
                    saw_new = true;
                }
                // The next save after a crash completes and cleans up.
                let newer = checkpoint(new.state.epoch, 3);
                save(d.path(), &newer).unwrap();
                assert!(bits(&load_latest(d.path()).unwrap().unwrap()) == bits(&newer), "step {k}");
                let mut left: Vec<String> = std::fs::read_dir(d.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                left.sort();
                let mut want = vec!["epoch-3".to_string(), format!("epoch-{}", new.state.epoch), "latest".into()];
                want.dedup();
                assert_eq!(left, want, "crash at step {k}");
                if crashed.is_ok() {
                    break;
                }
                assert!(crashed.unwrap_err().to_string().contains("injected crash"));
                k += 1;
                assert!(k < 100, "a save has fewer than 100 steps");
            }
            assert!(saw_old && saw_new && k > 10, "{k} steps");
        }
    }

    #[test]
    fn latest_must_name_an_epoch_directory_and_a_missing_one_falls_back() {
        let d = tempfile::tempdir().unwrap();
        assert!(load_latest(d.path()).unwrap().is_none());
        assert!(load_latest(&d.path().join("nothing-here")).unwrap().is_none());
        let (two, five) = (checkpoint(2, 1), checkpoint(5, 2));
        save(d.path(), &two).unwrap();
        save(d.path(), &five).unwrap();
        for bad in ["../epoch-5", "/tmp", "epoch-5/../epoch-2", "epoch-", "epoch-x", ".epoch-5.old", ""] {
            std::fs::write(d.path().join("latest"), bad).unwrap();
            let e = load_latest(d.path()).unwrap_err().to_string();
            assert!(e.ends_with(&format!("latest: names {bad:?}, which is not a checkpoint directory epoch-N")), "{e}");
        }
        // A missing target: the newest complete checkpoint up to it.
        std::fs::write(d.path().join("latest"), "epoch-4").unwrap();
        assert!(bits(&load_latest(d.path()).unwrap().unwrap()) == bits(&two));
        std::fs::write(d.path().join("latest"), "epoch-5\n").unwrap();
        std::fs::remove_file(d.path().join("epoch-5/optimizer.safetensors")).unwrap();
        assert!(bits(&load_latest(d.path()).unwrap().unwrap()) == bits(&two));
        // No pointer (a crash before the first one was written): the newest complete one.
        std::fs::remove_file(d.path().join("latest")).unwrap();
        assert!(bits(&load_latest(d.path()).unwrap().unwrap()) == bits(&two));
        std::fs::write(d.path().join("latest"), "epoch-1").unwrap();
        let e = load_latest(d.path()).unwrap_err().to_string();
        assert!(e.ends_with("latest: names epoch-1, which does not exist"), "{e}");
    }
}
