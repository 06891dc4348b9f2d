//! Model folders by path or by Hugging Face repo id, found in the local Hub cache (offline).

use std::path::PathBuf;

use crate::{Result, TextError};

/// A local folder, or the snapshot folder of a repo id in the local Hub cache (`$HF_HOME`) that
/// holds `marker` (a file every snapshot of that repository has, such as `config.json`).
pub fn resolve_folder(name: &str, marker: &str) -> Result<PathBuf> {
    let path = PathBuf::from(name);
    if path.is_dir() {
        return Ok(path);
    }
    let looks_like_repo = name.split('/').count() == 2 && !name.starts_with('.') && !name.starts_with('/');
    if looks_like_repo {
        let cache = hf_hub::Cache::from_env();
        if let Some(file) = cache.model(name.to_owned()).get(marker)
            && let Some(snapshot) = file.parent()
        {
            return Ok(snapshot.to_owned());
        }
        return Err(TextError::MissingFile {
            path: cache.path().join(format!("models--{}", name.replace('/', "--"))),
            hint: format!(
                "`{name}` is not in the local Hugging Face cache and this build does not download; \
                 run `huggingface-cli download {name}` (or pass a local folder)"
            ),
        });
    }
    Err(TextError::MissingFile { path, hint: "no such folder".into() })
}
