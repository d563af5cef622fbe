//! Pictures as PNG files: `plotters` draws into an RGB buffer, `image` encodes it, and the file is
//! written atomically. Text is set in DejaVu Sans, which ships with this crate
//! (`emma/assets/DejaVuSans.ttf`, Bitstream Vera licence in `DejaVuSans-LICENSE.txt`), so
//! drawing needs no system fonts.

use crate::error::{EmmaError, Result};
use plotters::backend::BitMapBackend;
use plotters::coord::Shift;
use plotters::drawing::{DrawingArea, IntoDrawingArea};
use std::path::Path;
use std::sync::OnceLock;

/// The font family every picture's text uses.
pub const FONT: &str = "sans-serif";

static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the bundled font with `plotters` (once per process).
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, plotters::style::FontStyle::Normal, DEJAVU_SANS)
                .map_err(|_| "the bundled DejaVu Sans does not parse as a font".to_owned())
        })
        .clone()
        .map_err(|detail| EmmaError::Picture {
            path: "(font)".into(),
            detail,
        })
}

/// Draws a `width` x `height` picture with `draw` (given the whole area, white) and writes it to
/// `path` as a PNG, atomically. An error names the file.
pub fn draw_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    register_font()?;
    let failed = |detail: String| EmmaError::Picture {
        path: path.to_owned(),
        detail,
    };
    let mut rgb = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        draw(&root).map_err(failed)?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let image = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| failed("the drawn buffer has the wrong size".into()))?;
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| failed(e.to_string()))?;
    crate::fsutil::write_atomic(path, &png)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::prelude::*;

    #[test]
    fn a_drawing_with_text_becomes_a_png_of_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        draw_png(&path, (120, 40), |root| {
            root.draw(&Text::new("loss", (5, 5), (FONT, 20).into_font()))
                .map_err(|e| e.to_string())
        })
        .unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (120, 40));
        // The text left dark pixels on the white background.
        assert!(img.pixels().any(|p| p.0.iter().all(|&c| c < 128)));
        let err = draw_png(&dir.path().join("no/such/dir.png"), (10, 10), |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("no/such/dir.png"), "{err}");
        let err = draw_png(&path, (10, 10), |_| Err("boom".into())).unwrap_err();
        assert!(
            err.to_string().contains("p.png") && err.to_string().contains("boom"),
            "{err}"
        );
    }
}
