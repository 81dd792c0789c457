//! The page's JSON body for a rule (`POST /api/rules`, `PUT /api/rules/ID`). Besides not
//! panicking: every refusal is a 400, and an accepted body gives fields without surrounding
//! whitespace and options with single spaces, as the rules file stores them.
#![no_main]

use forwarder::web::fuzzing::rule_body;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match rule_body(data) {
        Err(status) => assert_eq!(status, 400),
        Ok(entry) => {
            for field in [
                &entry.name,
                &entry.listen_port,
                &entry.dest_ip,
                &entry.dest_port,
            ] {
                assert_eq!(field.trim(), field.as_str());
            }
            assert!(!entry.options.contains("  "));
            assert_eq!(entry.options.trim(), entry.options);
        }
    }
});
