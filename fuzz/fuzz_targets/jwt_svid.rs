//! JWT-SVID bytes into `identity::jwt::verify_jwt_svid`, the verifier the agent's Workload API
//! (ValidateJWTSVID) calls, against a bundle authority holding the test key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let authorities = std::slice::from_ref(&*kith_fuzz::AUTHORITY);
        let _ = identity::jwt::verify_jwt_svid(
            token,
            authorities,
            kith_fuzz::AUDIENCE,
            kith_fuzz::now(),
        );
    }
});
