fn main() {
    let body = std::fs::read("/tmp/body.json").unwrap();
    let now: i64 = std::fs::read_to_string("/tmp/now.txt").unwrap().trim().parse().unwrap();
    let l = _core::decode::Limits::default();
    let t = std::time::Instant::now();
    let n: u32 = std::env::var("N").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    for _ in 0..n {
        let d = _core::decode::decode(&body, now, &l).unwrap();
        assert_eq!(d.len(), 1000);
    }
    println!("{:?} per batch", t.elapsed() / n);
}
