use train::data::Dataset;
use train::easy_vqa::{EasyVqaData, Split};

#[test]
#[ignore]
fn images_match_files() {
    let dir = std::path::Path::new("/root/.cache/emma-rs/easy-vqa-1.0/data");
    let data = EasyVqaData::load(dir, Split::Train, 500, false).unwrap();
    let mut bad = 0;
    for i in (0..data.len()).step_by(97) {
        let ex = data.get(i).unwrap();
        let id: u64 = ex.id.rsplit("image-").next().unwrap().parse().unwrap();
        let file = emma::image::load_image(dir.join(format!("train/images/{id}.png"))).unwrap();
        if file.as_raw() != ex.image.as_ref().unwrap().as_raw() {
            bad += 1;
        }
        if i < 500 {
            println!("{} {:?}", ex.id, ex.conversation.turns);
        }
    }
    println!("bad {bad}");
}
