//! `protocol::decode` on arbitrary bytes must never panic, for requests and responses alike,
//! and every request (and response) it accepts must survive `encode` → `decode` unchanged
//! (unless the re-encoded frame is over `MAX_FRAME`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockhook::holder::protocol::{decode, encode, ProtocolError, Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode::<Request>(data) {
        match encode(&request) {
            Ok(bytes) => {
                let again = decode::<Request>(&bytes)
                    .unwrap_or_else(|e| panic!("re-decoding an encoded request failed: {e}\n{request:?}"));
                assert_eq!(again, request, "request changed in an encode/decode round trip");
            }
            Err(ProtocolError::TooLarge(_)) => {}
            Err(e) => panic!("encoding a decoded request failed: {e}\n{request:?}"),
        }
    }
    if let Ok(response) = decode::<Response>(data) {
        match encode(&response) {
            Ok(bytes) => {
                let again = decode::<Response>(&bytes)
                    .unwrap_or_else(|e| panic!("re-decoding an encoded response failed: {e}\n{response:?}"));
                assert_eq!(again, response, "response changed in an encode/decode round trip");
            }
            Err(ProtocolError::TooLarge(_)) => {}
            Err(e) => panic!("encoding a decoded response failed: {e}\n{response:?}"),
        }
    }
});
