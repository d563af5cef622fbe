//! The built-in synthetic visual-question set "shapes": small images of one to four coloured
//! circles, squares and triangles on a dark background, each with one question about the scene.
//!
//! Six colours (red, green, blue, yellow, purple, white), three shapes and four question kinds:
//! the colour of a shape ("What colour is the circle?"), the shape of a colour ("What shape is the
//! red object?"), the number of shapes ("How many shapes are there?") and left-of ("Is the red
//! circle left of the blue square?"). Within a scene every colour is distinct, shapes never
//! overlap and no two centres are horizontally closer than half a shape, so every question has
//! one clear answer. Example `i` depends only on `(seed, i)`, so any range of the set can be
//! generated, in any order, on any machine.

use image::{ImageFormat, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::{Cursor, Write as _};
use std::path::{Path, PathBuf};

/// The background colour of every image.
const BACKGROUND: [u8; 3] = [30, 30, 30];
/// Placement attempts per shape before the scene is left with fewer shapes.
const PLACEMENT_TRIES: usize = 200;
/// The smallest gap in pixels between the bounding boxes of two shapes.
const GAP: f32 = 1.0;

/// How the shapes set is generated: image size and seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapesConfig {
    /// The rendered width and height in pixels (default 32; meant for 16 and up).
    pub image_size: u32,
    /// The seed of the whole set.
    pub seed: u64,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        ShapesConfig {
            image_size: 32,
            seed: 0,
        }
    }
}

/// The kind of a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShapeKind {
    /// A filled disc.
    Circle,
    /// A filled axis-aligned square.
    Square,
    /// A filled upward isosceles triangle.
    Triangle,
}

impl ShapeKind {
    /// All shape kinds.
    pub const ALL: [ShapeKind; 3] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];

    /// The name used in questions and answers: "circle", "square" or "triangle".
    pub fn name(&self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }
}

/// The colour of a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// Purple.
    Purple,
    /// White.
    White,
}

impl Colour {
    /// All colours.
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::White,
    ];

    /// The name used in questions and answers, e.g. "red".
    pub fn name(&self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::White => "white",
        }
    }

    /// The colour's pixel value.
    pub fn rgb(&self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 180, 60],
            Colour::Blue => [50, 90, 230],
            Colour::Yellow => [230, 210, 40],
            Colour::Purple => [150, 60, 190],
            Colour::White => [240, 240, 240],
        }
    }
}

/// One shape of a scene; centre and size (diameter or side) in pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    /// What is drawn.
    pub kind: ShapeKind,
    /// Its colour.
    pub colour: Colour,
    /// Horizontal centre in pixels.
    pub cx: f32,
    /// Vertical centre in pixels.
    pub cy: f32,
    /// Diameter (circle) or side (square, triangle) in pixels.
    pub size: f32,
}

impl Shape {
    /// Whether the point `(x, y)` lies inside the shape.
    fn contains(&self, x: f32, y: f32) -> bool {
        let half = self.size / 2.0;
        let (dx, dy) = (x - self.cx, y - self.cy);
        match self.kind {
            ShapeKind::Circle => dx * dx + dy * dy <= half * half,
            ShapeKind::Square => dx.abs() <= half && dy.abs() <= half,
            // Apex at the top centre, base along the bottom edge of the bounding square: the
            // half-width grows linearly from 0 at the apex to `half` at the base.
            ShapeKind::Triangle => {
                let t = (dy + half) / self.size;
                (0.0..=1.0).contains(&t) && dx.abs() <= t * half
            }
        }
    }

    /// Whether the bounding boxes of two shapes come closer than `GAP`.
    fn overlaps(&self, other: &Shape) -> bool {
        let reach = (self.size + other.size) / 2.0 + GAP;
        (self.cx - other.cx).abs() < reach && (self.cy - other.cy).abs() < reach
    }

    /// Whether the centres are far enough apart horizontally for "left of" to be clear.
    fn left_right_clear(&self, other: &Shape) -> bool {
        (self.cx - other.cx).abs() >= self.size.max(other.size) / 2.0
    }
}

/// The shapes of one image (one to four, all of distinct colours).
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    /// The shapes, in drawing order.
    pub shapes: Vec<Shape>,
}

/// The kind of question asked about a scene.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuestionKind {
    /// "What colour is the {shape}?"
    Colour,
    /// "What shape is the {colour} object?"
    Shape,
    /// "How many shapes are there?"
    Count,
    /// "Is the {colour} {shape} left of the {colour} {shape}?"
    LeftOf,
}

impl QuestionKind {
    /// The kind's name: "colour", "shape", "count" or "left_of".
    pub fn name(&self) -> &'static str {
        match self {
            QuestionKind::Colour => "colour",
            QuestionKind::Shape => "shape",
            QuestionKind::Count => "count",
            QuestionKind::LeftOf => "left_of",
        }
    }
}

/// One example of the set: an image, a question about it and the answer.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapesExample {
    /// The example's index in the set.
    pub index: u64,
    /// The rendered scene.
    pub image: RgbImage,
    /// The question, without any image marker.
    pub question: String,
    /// The one-word answer.
    pub answer: String,
    /// What kind of question it is.
    pub kind: QuestionKind,
}

/// The splitmix64 finaliser: a bijective 64-bit mix.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw from `[lo, hi]` that never panics on an empty range.
fn uniform(rng: &mut StdRng, lo: f32, hi: f32) -> f32 {
    lo + rng.gen::<f32>() * (hi - lo).max(0.0)
}

impl ShapesConfig {
    /// Example `index` of the set, fully determined by `(seed, index)` (its own random-number
    /// generator is seeded from a mix of both), never by call order.
    pub fn example(&self, index: u64) -> ShapesExample {
        self.scene_and_example(index).1
    }

    /// Example `index` together with the scene it shows.
    fn scene_and_example(&self, index: u64) -> (Scene, ShapesExample) {
        let mut rng = StdRng::seed_from_u64(splitmix64(self.seed ^ splitmix64(index)));
        let scene = self.scene(&mut rng);
        let (kind, question, answer) = ask(&scene, &mut rng);
        let image = render(&scene, self.image_size);
        (
            scene,
            ShapesExample {
                index,
                image,
                question,
                answer,
                kind,
            },
        )
    }

    /// A random scene: one to four shapes of distinct colours, fully inside the image, not
    /// overlapping and horizontally apart; a shape that cannot be placed is left out.
    fn scene(&self, rng: &mut StdRng) -> Scene {
        let side = self.image_size as f32;
        let min_size = (side / 5.0).max(1.0);
        let max_size = (side / 3.0).max(min_size);
        let wanted = rng.gen_range(1..=4usize);
        let mut colours = Colour::ALL;
        colours.shuffle(rng);
        let mut shapes: Vec<Shape> = Vec::with_capacity(wanted);
        for &colour in &colours[..wanted] {
            let kind = ShapeKind::ALL[rng.gen_range(0..ShapeKind::ALL.len())];
            let size = uniform(rng, min_size, max_size);
            let placed = (0..PLACEMENT_TRIES).find_map(|_| {
                let half = size / 2.0;
                let cx = uniform(rng, half, side - half);
                let cy = uniform(rng, half, side - half);
                let shape = Shape {
                    kind,
                    colour,
                    cx,
                    cy,
                    size,
                };
                shapes
                    .iter()
                    .all(|s| !s.overlaps(&shape) && s.left_right_clear(&shape))
                    .then_some(shape)
            });
            match placed {
                Some(shape) => shapes.push(shape),
                None => break,
            }
        }
        Scene { shapes }
    }
}

/// A question about `scene`, its kind chosen uniformly from those the scene allows, and the answer.
fn ask(scene: &Scene, rng: &mut StdRng) -> (QuestionKind, String, String) {
    let shapes = &scene.shapes;
    let unique: Vec<&Shape> = shapes
        .iter()
        .filter(|s| shapes.iter().filter(|o| o.kind == s.kind).count() == 1)
        .collect();
    let mut kinds = vec![QuestionKind::Shape, QuestionKind::Count];
    if !unique.is_empty() {
        kinds.push(QuestionKind::Colour);
    }
    if shapes.len() >= 2 {
        kinds.push(QuestionKind::LeftOf);
    }
    let kind = kinds[rng.gen_range(0..kinds.len())];
    match kind {
        QuestionKind::Colour => {
            let s = unique[rng.gen_range(0..unique.len())];
            (
                kind,
                format!("What colour is the {}?", s.kind.name()),
                s.colour.name().to_string(),
            )
        }
        QuestionKind::Shape => {
            let s = &shapes[rng.gen_range(0..shapes.len())];
            (
                kind,
                format!("What shape is the {} object?", s.colour.name()),
                s.kind.name().to_string(),
            )
        }
        QuestionKind::Count => {
            let words = ["one", "two", "three", "four"];
            (
                kind,
                "How many shapes are there?".to_string(),
                words[shapes.len() - 1].to_string(),
            )
        }
        QuestionKind::LeftOf => {
            // An ordered pair drawn uniformly, so "yes" and "no" are equally likely.
            let i = rng.gen_range(0..shapes.len());
            let j = (i + rng.gen_range(1..shapes.len())) % shapes.len();
            let (a, b) = (&shapes[i], &shapes[j]);
            let question = format!(
                "Is the {} {} left of the {} {}?",
                a.colour.name(),
                a.kind.name(),
                b.colour.name(),
                b.kind.name()
            );
            (kind, question, if a.cx < b.cx { "yes" } else { "no" }.to_string())
        }
    }
}

/// Renders `scene` as an `image_size` x `image_size` image: filled shapes on a dark grey
/// background, each pixel tested at its centre.
pub fn render(scene: &Scene, image_size: u32) -> RgbImage {
    RgbImage::from_fn(image_size, image_size, |x, y| {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        let colour = scene
            .shapes
            .iter()
            .rev()
            .find(|s| s.contains(px, py))
            .map(|s| s.colour.rgb());
        Rgb(colour.unwrap_or(BACKGROUND))
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `count` examples starting at `first` in LLaVA format: `dir/images/{index:07}.png` and
/// `dir/data.json`, a list of `{"id", "image", "conversations"}` records. Every file is written
/// atomically. Returns the path of the JSON file.
pub fn write_llava(cfg: &ShapesConfig, first: u64, count: u64, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("images"))?;
    let mut records = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for index in first..first.saturating_add(count) {
        let example = cfg.example(index);
        let image = format!("images/{index:07}.png");
        let mut png = Vec::new();
        example
            .image
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .map_err(std::io::Error::other)?;
        write_atomic(&dir.join(&image), &png)?;
        records.push(json!({
            "id": format!("shapes-{index}"),
            "image": image,
            "conversations": [
                {"from": "human", "value": format!("<image>\n{}", example.question)},
                {"from": "gpt", "value": example.answer},
            ],
        }));
    }
    let json_path = dir.join("data.json");
    let bytes = serde_json::to_vec_pretty(&Value::Array(records))?;
    write_atomic(&json_path, &bytes)?;
    Ok(json_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg() -> ShapesConfig {
        ShapesConfig {
            image_size: 32,
            seed: 7,
        }
    }

    #[test]
    fn examples_are_deterministic_per_index() {
        let c = cfg();
        for index in [0, 1, 17, 123_456] {
            assert_eq!(c.example(index), c.example(index));
        }
        // Call order does not matter.
        let forward: Vec<_> = (0..10).map(|i| c.example(i)).collect();
        let backward: Vec<_> = (0..10).rev().map(|i| c.example(i)).collect();
        assert!(forward.iter().eq(backward.iter().rev()));
        // Different indices and different seeds give different examples.
        let (a, b) = (c.example(0), c.example(1));
        assert!(a.image != b.image || a.question != b.question);
        let other = ShapesConfig { seed: 8, ..c }.example(0);
        assert!(a.image != other.image || a.question != other.question);
        let distinct: std::collections::HashSet<Vec<u8>> =
            (0..100).map(|i| c.example(i).image.into_raw()).collect();
        assert!(
            distinct.len() > 95,
            "only {} distinct images of 100",
            distinct.len()
        );
    }

    #[test]
    fn scenes_follow_the_rules() {
        let c = cfg();
        let side = c.image_size as f32;
        let mut counts = [0usize; 5];
        for index in 0..500 {
            let (scene, example) = c.scene_and_example(index);
            let shapes = &scene.shapes;
            assert!((1..=4).contains(&shapes.len()));
            counts[shapes.len()] += 1;
            assert_eq!(example.image.dimensions(), (32, 32));
            for (i, s) in shapes.iter().enumerate() {
                let half = s.size / 2.0;
                assert!(
                    s.size >= side / 5.0 - 1e-3 && s.size <= side / 3.0 + 1e-3,
                    "size {}",
                    s.size
                );
                assert!(s.cx - half >= 0.0 && s.cx + half <= side, "x out of the image");
                assert!(s.cy - half >= 0.0 && s.cy + half <= side, "y out of the image");
                for t in &shapes[i + 1..] {
                    assert_ne!(s.colour, t.colour, "repeated colour in example {index}");
                    assert!(!s.overlaps(t), "overlap in example {index}");
                    assert!((s.cx - t.cx).abs() >= s.size.max(t.size) / 2.0, "left-of margin");
                }
            }
        }
        // Placement rarely fails: every count occurs often.
        assert!(counts[1..].iter().all(|&n| n > 80), "shape counts {counts:?}");
    }

    #[test]
    fn answers_match_the_scene() {
        let c = cfg();
        for index in 0..500 {
            let (scene, ex) = c.scene_and_example(index);
            let shapes = &scene.shapes;
            let find = |colour: &str, kind: &str| {
                shapes
                    .iter()
                    .find(|s| s.colour.name() == colour && s.kind.name() == kind)
                    .copied()
            };
            match ex.kind {
                QuestionKind::Colour => {
                    let kind = ex
                        .question
                        .strip_prefix("What colour is the ")
                        .unwrap()
                        .trim_end_matches('?');
                    let matching: Vec<_> = shapes.iter().filter(|s| s.kind.name() == kind).collect();
                    assert_eq!(matching.len(), 1, "ambiguous: {}", ex.question);
                    assert_eq!(ex.answer, matching[0].colour.name());
                }
                QuestionKind::Shape => {
                    let colour = ex.question.strip_prefix("What shape is the ").unwrap();
                    let colour = colour.strip_suffix(" object?").unwrap();
                    let matching: Vec<_> = shapes.iter().filter(|s| s.colour.name() == colour).collect();
                    assert_eq!(matching.len(), 1);
                    assert_eq!(ex.answer, matching[0].kind.name());
                }
                QuestionKind::Count => {
                    assert_eq!(ex.question, "How many shapes are there?");
                    let words = ["one", "two", "three", "four"];
                    assert_eq!(ex.answer, words[shapes.len() - 1]);
                }
                QuestionKind::LeftOf => {
                    let rest = ex
                        .question
                        .strip_prefix("Is the ")
                        .unwrap()
                        .strip_suffix('?')
                        .unwrap();
                    let (first, second) = rest.split_once(" left of the ").unwrap();
                    let (c1, k1) = first.split_once(' ').unwrap();
                    let (c2, k2) = second.split_once(' ').unwrap();
                    let (a, b) = (find(c1, k1).unwrap(), find(c2, k2).unwrap());
                    assert_ne!(a, b);
                    assert_eq!(ex.answer, if a.cx < b.cx { "yes" } else { "no" });
                }
            }
        }
    }

    #[test]
    fn answers_and_kinds_are_balanced() {
        let c = cfg();
        let n = 2000;
        let mut answers: HashMap<String, usize> = HashMap::new();
        let mut kinds: HashMap<QuestionKind, usize> = HashMap::new();
        let mut yes_no = [0usize; 2];
        for index in 0..n {
            let ex = c.example(index);
            *answers.entry(ex.answer.clone()).or_default() += 1;
            *kinds.entry(ex.kind).or_default() += 1;
            if ex.kind == QuestionKind::LeftOf {
                yes_no[usize::from(ex.answer == "yes")] += 1;
            }
        }
        for (answer, &k) in &answers {
            assert!(k as f64 / n as f64 <= 0.30, "answer {answer:?} in {k} of {n}");
        }
        for kind in [
            QuestionKind::Colour,
            QuestionKind::Shape,
            QuestionKind::Count,
            QuestionKind::LeftOf,
        ] {
            let share = kinds.get(&kind).copied().unwrap_or(0) as f64 / n as f64;
            assert!((0.15..=0.35).contains(&share), "{} share {share}", kind.name());
        }
        let yes_share = yes_no[1] as f64 / (yes_no[0] + yes_no[1]) as f64;
        assert!((0.4..=0.6).contains(&yes_share), "left-of yes share {yes_share}");
    }

    #[test]
    fn rendered_shapes_have_their_colour() {
        let c = cfg();
        for index in 0..200 {
            let (scene, ex) = c.scene_and_example(index);
            for s in &scene.shapes {
                let covered = ex.image.pixels().filter(|p| p.0 == s.colour.rgb()).count();
                assert!(covered >= 12, "a {} covers {covered} pixels", s.kind.name());
                if s.kind != ShapeKind::Triangle {
                    let centre = ex.image.get_pixel(s.cx as u32, s.cy as u32);
                    assert_eq!(centre.0, s.colour.rgb(), "centre of a {}", s.kind.name());
                }
            }
            let background = ex.image.pixels().filter(|p| p.0 == BACKGROUND).count();
            assert!(background > 32 * 32 / 4, "too little background");
        }
        // A triangle is wider at its base than near its apex.
        let t = Shape {
            kind: ShapeKind::Triangle,
            colour: Colour::Red,
            cx: 16.0,
            cy: 16.0,
            size: 10.0,
        };
        let img = render(&Scene { shapes: vec![t] }, 32);
        let row = |y: u32| {
            (0..32)
                .filter(|&x| img.get_pixel(x, y).0 == Colour::Red.rgb())
                .count()
        };
        assert!(row(12) < row(20), "rows {} and {}", row(12), row(20));
        assert_eq!(img.get_pixel(16, 19).0, Colour::Red.rgb());
        assert_eq!(img.get_pixel(12, 12).0, BACKGROUND);
    }

    #[test]
    fn write_llava_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg();
        let json_path = write_llava(&c, 40, 5, dir.path()).unwrap();
        assert_eq!(json_path, dir.path().join("data.json"));
        let records: Vec<Value> = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
        assert_eq!(records.len(), 5);
        for (record, index) in records.iter().zip(40u64..) {
            let ex = c.example(index);
            assert_eq!(record["id"], format!("shapes-{index}"));
            let image = record["image"].as_str().unwrap();
            assert_eq!(image, format!("images/{index:07}.png"));
            let conv = record["conversations"].as_array().unwrap();
            assert_eq!(conv.len(), 2);
            assert_eq!(conv[0]["from"], "human");
            assert_eq!(conv[0]["value"], format!("<image>\n{}", ex.question));
            assert_eq!(conv[1]["from"], "gpt");
            assert_eq!(conv[1]["value"], ex.answer);
            let decoded = image::open(dir.path().join(image)).unwrap().to_rgb8();
            assert_eq!(decoded, ex.image);
        }
        // No temporary files are left behind.
        let leftovers = std::fs::read_dir(dir.path().join("images"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(leftovers, 0);
    }
}
