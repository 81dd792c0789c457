//! Running the forwarder as a gateway service: telling systemd how it is doing (`notify`),
//! dropping root after start (`privilege`), the exit codes a service manager acts on (`exit`),
//! and the signals beyond reload and stop (`signals`).

pub mod exit;
pub mod notify;
pub mod privilege;
pub mod signals;
pub mod tproxy;

/// The man page's sections after OPTIONS: EXIT STATUS, SIGNALS, FILES and SEE ALSO, as roff.
pub fn man_sections() -> Vec<(&'static str, String)> {
    let mut sections = exit::man_sections();
    sections.push((
        "FILES",
        ".TP\n\\fI/etc/forwarder/entries.csv\\fR\n\
         The packaged service's rules file (a conffile). The web page replaces it and keeps \
         entries.csv.bak beside it, so the folder belongs to the forwarder user.\n\
         .TP\n\\fI/usr/lib/systemd/system/forwarder.service\\fR\n\
         The unit: Type=notify, User=forwarder with only CAP_NET_BIND_SERVICE, \
         ExecReload sends SIGHUP, WatchdogSec=10.\n"
            .to_string(),
    ));
    sections.push((
        "SEE ALSO",
        "systemd.service(5), systemctl(1), sd_notify(3)\n".to_string(),
    ));
    sections
}
