//! Property tests of the protocol core: the frame decoders, and the connection state
//! machine with the hub, UDP and timers run against a reference model.
//!
//! The generators here produce the same inputs as the fuzz targets in `fuzz/` (which
//! decode theirs from raw bytes), and both check them with `tests/harness`: a few hundred
//! cases run on every `cargo test`, and the fuzzer searches much further. Scenarios that
//! once failed are kept below as fixed regression cases.

mod harness;

use harness::{Body, Piece, Scenario, Settings, Step, check_decode, name, run};
use proptest::collection::vec;
use proptest::prelude::*;

/// Bytes in which 0x0A is common, so that streams hold many frames.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    vec(prop_oneof![4 => any::<u8>(), 1 => Just(0x0A)], 0..200)
}

fn text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z /+.*>]{0,10}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..12),
    ]
}

/// Indices into `harness::SEGMENTS`.
fn parts() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 1..4)
}

fn target() -> impl Strategy<Value = Vec<u8>> {
    (parts(), prop::bool::weighted(0.2)).prop_map(|(p, plus)| name(&p, plus))
}

/// One frame, most often with data that fits its opcode.
fn frame() -> impl Strategy<Value = Piece> {
    let f = |op: u8, body: Body| Piece::Frame { op, body };
    prop_oneof![
        4 => target().prop_map(move |t| f(0x01, Body::Name(t))),
        5 => (prop_oneof![Just(0x04u8), Just(0x08u8)], target(), text())
            .prop_map(move |(op, target, text)| f(op, Body::Routed { target, text })),
        2 => (any::<u8>(), text()).prop_map(move |(pick, text)| f(0x05, Body::Response { pick, text })),
        2 => prop_oneof![target(), Just(Vec::new())].prop_map(move |t| f(0x0D, Body::Name(t))),
        2 => text().prop_map(move |t| f(0x06, Body::Bytes(t))),
        1 => any::<bool>().prop_map(move |right| f(0x0F, Body::Secret(right))),
        2 => any::<u8>().prop_map(move |n| f(0x02, Body::Token(n))),
        3 => (prop_oneof![0u8..=0x10, any::<u8>()], vec(any::<u8>(), 0..20))
            .prop_map(move |(op, b)| f(op, Body::Bytes(b))),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![4 => frame(), 1 => stream().prop_map(Piece::Raw)]
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        (20usize..=96, 10u64..=3000, 10u64..=5000, 1024usize..=1536),
        (0u32..=4, 0usize..=8, 0usize..=3, 0u32..=5),
        prop::bool::weighted(0.25),
        prop_oneof![
            3 => Just(Vec::new()),
            1 => vec((target(), vec(target(), 1..3)), 1..3),
        ],
    )
        .prop_map(
            |(
                (max_frame, identify_ms, idle_ms, outbound_limit),
                (udp_quit_per_sec, max_connections, per_source, connect_rate),
                secret,
                rules,
            )| Settings {
                max_frame,
                identify_ms,
                idle_ms,
                outbound_limit,
                udp_quit_per_sec,
                max_connections,
                per_source,
                connect_rate,
                secret,
                rules,
            },
        )
}

fn connect() -> impl Strategy<Value = Step> {
    (any::<u8>(), prop::bool::weighted(0.8))
        .prop_map(|(source, reads)| Step::Connect { source, reads })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => connect(),
        20 => (any::<u8>(), vec(piece(), 1..4), any::<u16>())
            .prop_map(|(conn, pieces, split)| Step::Tcp { conn, pieces, split }),
        8 => (any::<u8>(), prop_oneof![4 => frame().prop_map(|f| vec![f]), 1 => vec(piece(), 0..3)])
            .prop_map(|(source, pieces)| Step::Udp { source, pieces }),
        3 => any::<u8>().prop_map(|conn| Step::Read { conn }),
        2 => any::<u8>().prop_map(|conn| Step::Eof { conn }),
        5 => (prop_oneof![0u16..50, 0u16..6000], any::<bool>())
            .prop_map(|(ms, sweep)| Step::Advance { ms, sweep }),
        1 => settings().prop_map(Step::Reload),
        1 => Just(Step::Shutdown),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (settings(), vec(connect(), 1..4), vec(step(), 0..48)).prop_map(
        |(settings, mut steps, more)| {
            steps.extend(more);
            Scenario { settings, steps }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Both decoders: frames within the maximum, ending at a 0x0A, re-encoding to the
    /// bytes consumed, independent of how the stream is cut into reads.
    #[test]
    fn decoders_hold_their_invariants(bytes in stream(), max in 0usize..210, splits in vec(any::<usize>(), 0..6)) {
        check_decode(&bytes, max, &splits);
    }

    /// Connections, datagrams, timers, reloads and shutdown agree with the model, and
    /// every invariant holds after every step.
    #[test]
    fn connections_agree_with_the_model(s in scenario()) {
        run(&s);
    }
}

fn plain_settings() -> Settings {
    Settings {
        max_frame: 64,
        identify_ms: 100,
        idle_ms: 1000,
        outbound_limit: 1024,
        udp_quit_per_sec: 4,
        max_connections: 0,
        per_source: 0,
        connect_rate: 0,
        secret: false,
        rules: Vec::new(),
    }
}

fn tcp(op: u8, body: Body) -> Step {
    Step::Tcp {
        conn: 0,
        pieces: vec![Piece::Frame { op, body }],
        split: 0,
    }
}

/// An Identify read after the identify timeout closed the connection (the timer sweep
/// ran first; the reader already had the bytes) must not register the shim: the
/// connection is over, and its `finish` will not remove it again, so its token, its
/// identity and a UDP binding would stay in the table and the router for good.
#[test]
fn identify_after_identify_timeout_registers_nothing() {
    run(&Scenario {
        settings: plain_settings(),
        steps: vec![
            Step::Connect {
                source: 0,
                reads: true,
            },
            Step::Advance {
                ms: 100,
                sweep: true,
            },
            tcp(0x01, Body::Name(b"peq.a.bob".to_vec())),
        ],
    });
}

/// The same for a rename read after the idle timeout closed an identified shim: the
/// router must not take the new name in (Who would list it for good).
#[test]
fn rename_after_idle_timeout_routes_nothing() {
    run(&Scenario {
        settings: plain_settings(),
        steps: vec![
            Step::Connect {
                source: 0,
                reads: true,
            },
            tcp(0x01, Body::Name(b"peq.a.bob".to_vec())),
            Step::Advance {
                ms: 1000,
                sweep: true,
            },
            tcp(0x01, Body::Name(b"peq.a.bobby".to_vec())),
        ],
    });
}
