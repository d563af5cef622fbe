//! Image loading and the preprocessing of EMMA's two vision encoders: resize the shorter side
//! (bicubic, Catmull-Rom), centre crop to a square, scale to [0, 1] and normalise per channel.

use crate::error::{io_err, EmmaError, Result};
use image::imageops::{self, FilterType};
use image::{ImageReader, RgbImage};
use std::path::Path;
use tensor::Tensor;

/// Per-channel mean of SigLIP's input normalisation.
pub const SIGLIP_MEAN: [f32; 3] = [0.5, 0.5, 0.5];
/// Per-channel standard deviation of SigLIP's input normalisation.
pub const SIGLIP_STD: [f32; 3] = [0.5, 0.5, 0.5];
/// Per-channel mean of DINOv2's input normalisation (ImageNet statistics).
pub const DINOV2_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel standard deviation of DINOv2's input normalisation (ImageNet statistics).
pub const DINOV2_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The most memory a decoded image may take (RGBA, 4 bytes a pixel): 256 MiB, a 8192 x 8192
/// image. A larger one is refused before decoding, with its size.
pub const MAX_DECODED_BYTES: u64 = 256 << 20;

/// Reads a PNG or JPEG file (the format is told by its content) as 8-bit RGB; grey images are
/// expanded and alpha is dropped.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bad = |detail: String| EmmaError::Image {
        source_name: path.display().to_string(),
        detail,
    };
    if std::fs::metadata(path).map_err(io_err(path))?.len() == 0 {
        return Err(bad("the file is empty".to_owned()));
    }
    let open = || ImageReader::open(path).and_then(ImageReader::with_guessed_format);
    let (w, h) = open()
        .map_err(io_err(path))?
        .into_dimensions()
        .map_err(|e| bad(format!("cannot decode: {e}")))?;
    let bytes = u64::from(w) * u64::from(h) * 4;
    if bytes > MAX_DECODED_BYTES {
        return Err(bad(format!(
            "the image is {w}x{h}: decoding it would take {} MiB, more than the {} MiB allowed",
            bytes >> 20,
            MAX_DECODED_BYTES >> 20
        )));
    }
    let img = open()
        .map_err(io_err(path))?
        .decode()
        .map_err(|e| bad(format!("cannot decode: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(bad(format!(
            "the image has no pixels ({}x{})",
            img.width(),
            img.height()
        )));
    }
    Ok(img.into_rgb8())
}

/// An RGB image from `width * height * 3` bytes, row-major, channels interleaved (for images
/// made in memory).
pub fn from_rgb_bytes(width: usize, height: usize, bytes: &[u8]) -> Result<RgbImage> {
    let bad = |detail: String| EmmaError::Image {
        source_name: format!("in-memory {width}x{height} RGB buffer"),
        detail,
    };
    if width == 0 || height == 0 {
        return Err(bad("the image has no pixels".to_owned()));
    }
    let expected = width.checked_mul(height).and_then(|n| n.checked_mul(3));
    if expected != Some(bytes.len()) {
        return Err(bad(format!(
            "{} bytes given, {width} * {height} * 3 needed",
            bytes.len()
        )));
    }
    let (w, h) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(bad("the image is too large".to_owned())),
    };
    RgbImage::from_raw(w, h, bytes.to_vec()).ok_or_else(|| bad("the buffer does not fit".to_owned()))
}

/// `img` resized so that its shorter side is `size` (bicubic, Catmull-Rom; the longer side
/// rounded down, as torchvision does), centre-cropped to `size x size`, scaled to [0, 1] and
/// normalised per channel: a `[3, size, size]` f32 tensor.
pub fn preprocess(img: &RgbImage, size: usize, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let square = resize_and_crop(img, size)?;
    normalise(&square, mean, std)
}

/// The inputs of both vision encoders from one image, resized and cropped to `size` once:
/// `(SigLIP pixels, DINOv2 pixels)`, each `[3, size, size]` f32.
pub fn pixels_for_both(img: &RgbImage, size: usize) -> Result<(Tensor, Tensor)> {
    let square = resize_and_crop(img, size)?;
    Ok((
        normalise(&square, SIGLIP_MEAN, SIGLIP_STD)?,
        normalise(&square, DINOV2_MEAN, DINOV2_STD)?,
    ))
}

/// Resizes the shorter side of `img` to `size` and crops the centre `size x size` square, with
/// torchvision's `Resize(size)` and `CenterCrop(size)` geometry.
fn resize_and_crop(img: &RgbImage, size: usize) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    let bad = |detail: String| EmmaError::Image {
        source_name: format!("in-memory {w}x{h} RGB image"),
        detail,
    };
    if w == 0 || h == 0 {
        return Err(bad("the image has no pixels".to_owned()));
    }
    let side = match u32::try_from(size) {
        Ok(s) if s > 0 => s,
        _ => return Err(bad(format!("cannot preprocess to size {size}"))),
    };
    let (short, long) = (w.min(h), w.max(h));
    let scaled_long = u32::try_from(u64::from(side) * u64::from(long) / u64::from(short)).map_err(|_| {
        bad(format!(
            "resizing to shorter side {size} makes the image too large"
        ))
    })?;
    let (new_w, new_h) = if w <= h {
        (side, scaled_long)
    } else {
        (scaled_long, side)
    };
    let resized;
    let src = if (new_w, new_h) == (w, h) {
        img
    } else {
        resized = imageops::resize(img, new_w, new_h, FilterType::CatmullRom);
        &resized
    };
    // torchvision rounds the offsets half to even.
    let left = (f64::from(new_w - side) / 2.0).round_ties_even() as u32;
    let top = (f64::from(new_h - side) / 2.0).round_ties_even() as u32;
    Ok(imageops::crop_imm(src, left, top, side, side).to_image())
}

/// `[3, h, w]` f32 of `(pixel / 255 - mean[c]) / std[c]`.
fn normalise(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let plane = w as usize * h as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (f32::from(px.0[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    Ok(Tensor::from_vec(data, &[3, h as usize, w as usize])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w x h` image whose pixel (x, y) is `(x, y, 7)`.
    fn gradient(w: usize, h: usize) -> RgbImage {
        let bytes: Vec<u8> = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [x as u8, y as u8, 7]))
            .collect();
        from_rgb_bytes(w, h, &bytes).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec::<f32>().unwrap()
    }

    #[test]
    fn crop_without_resize_keeps_the_centre() {
        // 8x3: no resize; left offset (8 - 3) / 2 = 2.5 rounds to 2, as torchvision's does.
        let t = preprocess(&gradient(8, 3), 3, [0.0; 3], [1.0; 3]).unwrap();
        assert_eq!(t.shape(), &[3, 3, 3]);
        let v = values(&t);
        let px = |c: usize, y: usize, x: usize| v[c * 9 + y * 3 + x] * 255.0;
        for y in 0..3 {
            for x in 0..3 {
                assert!((px(0, y, x) - (x + 2) as f32).abs() < 1e-3);
                assert!((px(1, y, x) - y as f32).abs() < 1e-3);
                assert!((px(2, y, x) - 7.0).abs() < 1e-3);
            }
        }
        // A tall image is cropped vertically.
        let v = values(&preprocess(&gradient(2, 5), 2, [0.0; 3], [1.0; 3]).unwrap());
        assert!((v[4] * 255.0 - 2.0).abs() < 1e-3 && (v[6] * 255.0 - 3.0).abs() < 1e-3);
    }

    #[test]
    fn resize_and_normalise() {
        let img = from_rgb_bytes(20, 10, &[51, 102, 204].repeat(200)).unwrap();
        let (siglip, dino) = pixels_for_both(&img, 5).unwrap();
        assert_eq!(siglip.shape(), &[3, 5, 5]);
        assert_eq!(dino.shape(), &[3, 5, 5]);
        let rgb = [0.2f32, 0.4, 0.8];
        for (c, chunk) in values(&siglip).chunks(25).enumerate() {
            assert!(
                chunk.iter().all(|&v| (v - (rgb[c] - 0.5) / 0.5).abs() < 1e-5),
                "{chunk:?}"
            );
        }
        for (c, chunk) in values(&dino).chunks(25).enumerate() {
            let want = (rgb[c] - DINOV2_MEAN[c]) / DINOV2_STD[c];
            assert!(chunk.iter().all(|&v| (v - want).abs() < 1e-5), "{chunk:?}");
        }
        // Upscaling works too, and a gradient stays monotone along x.
        let up = values(&preprocess(&gradient(4, 4), 9, [0.0; 3], [1.0; 3]).unwrap());
        assert_eq!(up.len(), 3 * 81);
        assert!(up[..9].windows(2).all(|p| p[0] <= p[1]), "{:?}", &up[..9]);
    }

    #[test]
    fn load_png_and_jpeg() {
        let dir = tempfile::tempdir().unwrap();
        let img = gradient(16, 12);
        let png = dir.path().join("a.png");
        img.save(&png).unwrap();
        assert_eq!(load_image(&png).unwrap(), img);
        // The format is read from the content, not the name.
        let jpeg = dir.path().join("b.png");
        img.save_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
        let back = load_image(&jpeg).unwrap();
        assert_eq!(back.dimensions(), (16, 12));
        let t = preprocess(&back, 8, SIGLIP_MEAN, SIGLIP_STD).unwrap();
        assert_eq!(t.shape(), &[3, 8, 8]);
        // Grey images become RGB.
        let grey = dir.path().join("g.png");
        image::GrayImage::from_raw(2, 1, vec![10, 200])
            .unwrap()
            .save(&grey)
            .unwrap();
        assert_eq!(
            load_image(&grey).unwrap().into_raw(),
            vec![10, 10, 10, 200, 200, 200]
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.png");
        let err = load_image(&missing).unwrap_err();
        assert!(
            matches!(err, EmmaError::Io { .. }) && err.to_string().contains("missing.png"),
            "{err}"
        );

        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        let err = load_image(&empty).unwrap_err();
        assert!(
            err.to_string().contains("empty.png") && err.to_string().contains("empty"),
            "{err}"
        );

        let corrupt = dir.path().join("corrupt.png");
        let mut bytes = Vec::new();
        gradient(8, 8)
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&corrupt, &bytes).unwrap();
        let err = load_image(&corrupt).unwrap_err();
        assert!(
            err.to_string().contains("corrupt.png") && err.to_string().contains("decode"),
            "{err}"
        );

        let text = dir.path().join("text.jpg");
        std::fs::write(&text, b"not an image at all").unwrap();
        let err = load_image(&text).unwrap_err();
        assert!(err.to_string().contains("text.jpg"), "{err}");
    }

    #[test]
    fn bad_buffers_and_sizes_are_errors() {
        assert!(from_rgb_bytes(0, 4, &[])
            .unwrap_err()
            .to_string()
            .contains("no pixels"));
        let err = from_rgb_bytes(2, 2, &[0; 11]).unwrap_err();
        assert!(err.to_string().contains("11 bytes given"), "{err}");
        let err = preprocess(&gradient(2, 2), 0, SIGLIP_MEAN, SIGLIP_STD).unwrap_err();
        assert!(err.to_string().contains("size 0"), "{err}");
    }

    #[test]
    fn an_image_too_large_to_decode_is_refused_by_its_header() {
        // A PNG whose header says 20000 x 20000 (1.5 GiB decoded), with almost no pixel data.
        fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            c.extend(kind);
            c.extend(data);
            let mut crc = 0xffff_ffffu32;
            for &b in kind.iter().chain(data) {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 != 0 {
                        (crc >> 1) ^ 0xedb8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            c.extend((!crc).to_be_bytes());
            c
        }
        let mut ihdr = 20_000u32.to_be_bytes().to_vec();
        ihdr.extend(20_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
        png.extend(chunk(b"IEND", &[]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        std::fs::write(&path, png).unwrap();
        let err = load_image(&path).unwrap_err().to_string();
        assert!(
            err.contains("20000x20000") && err.contains("huge.png") && err.contains("MiB allowed"),
            "{err}"
        );
    }
}
