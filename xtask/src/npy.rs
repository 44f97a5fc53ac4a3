//! Minimal `.npy` (NumPy format 1.0) writer for little-endian f32 arrays, so
//! Python references can load our outputs with `numpy.load`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Writes `data` with `shape` (row-major) as an f32 `.npy` file.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> anyhow::Result<()> {
    anyhow::ensure!(
        shape.iter().product::<usize>() == data.len(),
        "shape {shape:?} does not match {} values",
        data.len()
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // magic(6) + version(2) + header length(2) + header + '\n', padded to 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&u16::try_from(header.len())?.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(&out)?;
    Ok(())
}

/// Reads a little-endian f32 `.npy` file (format 1.x or 2.x, C order):
/// returns its shape and values.
pub fn read_f32(path: &Path) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(bytes.len() >= 10 && &bytes[..6] == b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            anyhow::ensure!(bytes.len() >= 12, "{}: truncated header", path.display());
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => anyhow::bail!("{}: unsupported .npy version {v}", path.display()),
    };
    let header = std::str::from_utf8(bytes.get(start..start + header_len).context("truncated header")?)?;
    anyhow::ensure!(
        header.contains("'descr': '<f4'"),
        "{}: expected little-endian f32, header {header}",
        path.display()
    );
    anyhow::ensure!(header.contains("'fortran_order': False"), "{}: Fortran order is not supported", path.display());
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .with_context(|| format!("{}: no shape in header {header}", path.display()))?;
    let shape: Vec<usize> =
        shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    anyhow::ensure!(data.len() == n * 4, "{}: {} data bytes for shape {shape:?}", path.display(), data.len());
    Ok((shape, data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_files() {
        let dir = std::env::temp_dir().join(format!("npy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[2, 3, 4], &values).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!((10 + usize::from(u16::from_le_bytes([bytes[8], bytes[9]]))) % 64, 0, "header padded to 64");
        assert_eq!(read_f32(&path).unwrap(), (vec![2, 3, 4], values));
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        assert!(read_f32(&path).unwrap_err().to_string().contains("data bytes"));
        std::fs::write(&path, b"not numpy").unwrap();
        assert!(read_f32(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
