//! AdmissionReview bodies into `inject::review::review`, what the webhook server calls on
//! every request from the API server.
#![no_main]

use std::sync::LazyLock;

use inject::settings::Settings;
use libfuzzer_sys::fuzz_target;

static SETTINGS: LazyLock<Settings> = LazyLock::new(Settings::default);

fuzz_target!(|data: &[u8]| {
    let _ = inject::review::review(data, &SETTINGS);
});
