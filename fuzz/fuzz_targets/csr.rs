//! CSR bytes (PEM or DER) into the CA's validation: `ca::csr::check_csr`, which every issuing
//! path calls on the request body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ca::csr::check_csr(data, &kith_fuzz::EXPECTED_ID);
});
