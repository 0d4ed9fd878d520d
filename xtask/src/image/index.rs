//! The layout's multi-architecture tag: an OCI image index naming each architecture's image with
//! its platform, so that one reference serves a mixed cluster (a runtime pulls its own
//! platform's image; `skopeo copy --all` pushes them all). umoci makes one manifest per tag and
//! nothing above them, so this is written beside its work.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{setup, vm::Arch};

/// The tag of the index.
pub const TAG: &str = "latest";

const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The tag's name in a descriptor of `index.json`.
fn ref_name(descriptor: &Value) -> Option<&str> {
    descriptor["annotations"][REF_NAME].as_str()
}

/// The architectures whose tag `descriptors` (of `index.json`) has, with its descriptor.
fn tagged(descriptors: &[Value]) -> impl Iterator<Item = (Arch, &Value)> {
    [Arch::X86_64, Arch::Aarch64]
        .into_iter()
        .filter_map(|arch| {
            let d = descriptors
                .iter()
                .find(|d| ref_name(d) == Some(arch.deb()))?;
            Some((arch, d))
        })
}

/// Reads `index.json` of `layout`.
fn read(layout: &Path) -> Result<Value> {
    let path = layout.join("index.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Writes the index of the per-architecture tags present in `layout` as [`TAG`], replacing the
/// one before (its blob goes at the next `umoci gc`).
pub fn write(layout: &Path) -> Result<()> {
    let path = layout.join("index.json");
    let mut top = read(layout)?;
    let descriptors = top["manifests"]
        .as_array_mut()
        .with_context(|| format!("{} has no manifests", path.display()))?;
    descriptors.retain(|d| ref_name(d) != Some(TAG));
    let platforms: Vec<Value> = tagged(descriptors)
        .map(|(arch, d)| {
            json!({
                "mediaType": d["mediaType"],
                "digest": d["digest"],
                "size": d["size"],
                "platform": { "architecture": arch.deb(), "os": "linux" },
            })
        })
        .collect();
    if platforms.is_empty() {
        bail!("{} has no architecture's tag to index", layout.display());
    }
    let blob = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": platforms,
    }))?;
    let digest = format!("{:x}", Sha256::digest(&blob));
    let blob_path = layout.join("blobs/sha256").join(&digest);
    fs::write(&blob_path, &blob).with_context(|| format!("writing {}", blob_path.display()))?;
    descriptors.push(json!({
        "mediaType": INDEX_MEDIA_TYPE,
        "digest": format!("sha256:{digest}"),
        "size": blob.len(),
        "annotations": { REF_NAME: TAG },
    }));
    fs::write(&path, serde_json::to_vec(&top)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Checks the index with skopeo, a reader of its own: for each architecture, the image it
/// resolves [`TAG`] to has that architecture's tag's configuration (its platform, labels and
/// layers' digests), for every architecture tagged in `layout`.
pub fn check(layout: &Path) -> Result<()> {
    let top = read(layout)?;
    let descriptors = top["manifests"].as_array().map_or(&[][..], Vec::as_slice);
    let archs: Vec<Arch> = tagged(descriptors).map(|(arch, _)| arch).collect();
    if archs.is_empty() {
        bail!("{} has no architecture's tag", layout.display());
    }
    for arch in archs {
        let config = |tag: &str| -> Result<Value> {
            let out = setup::output(
                Command::new("skopeo")
                    .args(["--override-arch", arch.deb(), "--override-os", "linux"])
                    .args(["inspect", "--config"])
                    .arg(format!("oci:{}:{tag}", layout.display())),
            )?;
            serde_json::from_str(&out).context("parsing skopeo's answer")
        };
        let (via_index, own) = (config(TAG)?, config(arch.deb())?);
        if via_index["architecture"] != arch.deb() || via_index != own {
            bail!(
                "{TAG} resolves to an image of {} for {}, not its own tag's",
                via_index["architecture"],
                arch.deb()
            );
        }
        eprintln!(
            "xtask image: {TAG} for {}: its own tag's image (layers {})",
            arch.deb(),
            own["rootfs"]["diff_ids"]
        );
    }
    Ok(())
}
