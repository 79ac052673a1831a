//! Property tests of the protocol core: the frame decoders, and the connection state
//! machine with the hub, UDP and timers run against a reference model.
//!
//! The generators here produce the same inputs as the fuzz targets in `fuzz/` (which
//! decode theirs from raw bytes), and both check them with `tests/harness`: a few hundred
//! cases run on every `cargo test`, and the fuzzer searches much further. Scenarios that
//! once failed are kept below as fixed regression cases, and a few fixed scenarios pin
//! the rules the model predicts with the outcome a client sees ([`harness::Report`]):
//! CRLF line ends, datagrams without their 0x0A, the two-sweeps timer rule, the write
//! deadline, slices, the shutdown Quit.

mod harness;

use harness::{
    Body, CloseReason, Piece, Scenario, Settings, Step, check_decode, check_reject_texts, name, run,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Bytes in which 0x0A is common, so that streams hold many frames, and 0x0D too, so
/// that many of them end in CRLF.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![8 => any::<u8>(), 2 => Just(0x0A), 1 => Just(0x0D)],
        0..200,
    )
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

/// One frame, most often with data that fits its opcode; now and then ended by CRLF.
fn frame() -> impl Strategy<Value = Piece> {
    (op_and_body(), prop::bool::weighted(0.15)).prop_map(|((op, body), crlf)| Piece::Frame {
        op,
        body,
        crlf,
    })
}

fn op_and_body() -> impl Strategy<Value = (u8, Body)> {
    let f = |op: u8, body: Body| (op, body);
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

/// A UDP bind with a session token (most often a live one).
fn bind() -> impl Strategy<Value = Piece> {
    (any::<u8>(), prop::bool::weighted(0.1)).prop_map(|(n, crlf)| Piece::Frame {
        op: 0x02,
        body: Body::Token(n),
        crlf,
    })
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![4 => frame(), 1 => stream().prop_map(Piece::Raw)]
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        (
            20usize..=96,
            10u64..=3000,
            10u64..=5000,
            1024usize..=1536,
            prop_oneof![Just(10_000u64), 10u64..=5000],
        ),
        (0u32..=4, 0usize..=8, 0usize..=3, 0u32..=5),
        prop::bool::weighted(0.25),
        prop_oneof![
            3 => Just(Vec::new()),
            1 => vec((target(), vec(target(), 1..3)), 1..3),
        ],
        // The per-shim rates: most often lifted, else low enough to be reached.
        prop_oneof![
            2 => Just((0, 0, 0)),
            1 => (0u32..=8, 0u32..=12, 0u32..=3),
        ],
    )
        .prop_map(
            |(
                (max_frame, identify_ms, idle_ms, outbound_limit, write_deadline_ms),
                (udp_quit_per_sec, max_connections, per_source, connect_rate),
                secret,
                rules,
                (routed_per_sec, deliveries_per_sec, who_per_sec),
            )| Settings {
                max_frame,
                identify_ms,
                idle_ms,
                outbound_limit,
                write_deadline_ms,
                udp_quit_per_sec,
                max_connections,
                per_source,
                connect_rate,
                routed_per_sec,
                deliveries_per_sec,
                who_per_sec,
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
        8 => (
            any::<u8>(),
            prop_oneof![
                2 => bind().prop_map(|f| vec![f]),
                6 => frame().prop_map(|f| vec![f]),
                1 => vec(piece(), 0..3),
            ],
            prop::bool::weighted(0.8),
        )
            .prop_map(|(source, pieces, newline)| Step::Udp { source, pieces, newline }),
        3 => any::<u8>().prop_map(|conn| Step::Read { conn }),
        2 => any::<u8>().prop_map(|conn| Step::Eof { conn }),
        5 => (prop_oneof![0u16..50, 0u16..6000], 0u8..=2)
            .prop_map(|(ms, sweeps)| Step::Advance { ms, sweeps }),
        1 => settings().prop_map(Step::Reload),
        1 => Just(Step::Shutdown),
    ]
}

/// A client that does the handshake by the book: Auth (harmless without a secret) and
/// Identify in one read, and most often a UDP bind from its own source; so that most
/// scenarios have identified shims, and bound ones, for the steps after.
fn handshake() -> impl Strategy<Value = Vec<Step>> {
    (
        any::<u8>(),
        parts(),
        any::<u16>(),
        prop::bool::weighted(0.7),
    )
        .prop_map(|(conn, name_parts, split, bind)| {
            let frame = |op, body| Piece::Frame {
                op,
                body,
                crlf: false,
            };
            let mut steps = vec![Step::Tcp {
                conn,
                pieces: vec![
                    frame(0x0F, Body::Secret(true)),
                    frame(0x01, Body::Name(name(&name_parts, false))),
                ],
                split,
            }];
            if bind {
                steps.push(Step::Udp {
                    source: conn,
                    pieces: vec![frame(0x02, Body::Token(conn))],
                    newline: true,
                });
            }
            steps
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        settings(),
        vec(connect(), 1..4),
        vec(handshake(), 0..4),
        vec(step(), 0..48),
    )
        .prop_map(|(settings, mut steps, handshakes, more)| {
            steps.extend(handshakes.into_iter().flatten());
            steps.extend(more);
            Scenario { settings, steps }
        })
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
        write_deadline_ms: 10_000,
        udp_quit_per_sec: 4,
        max_connections: 0,
        per_source: 0,
        connect_rate: 0,
        routed_per_sec: 0,
        deliveries_per_sec: 0,
        who_per_sec: 0,
        secret: false,
        rules: Vec::new(),
    }
}

fn tcp(op: u8, body: Body) -> Step {
    Step::Tcp {
        conn: 0,
        pieces: vec![Piece::Frame {
            op,
            body,
            crlf: false,
        }],
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
            Step::Advance { ms: 100, sweeps: 2 },
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
                sweeps: 2,
            },
            tcp(0x01, Body::Name(b"peq.a.bobby".to_vec())),
        ],
    });
}

/// The refusal texts the model's Error frames are made of are those of the protocol.
#[test]
fn refusal_texts_are_the_documented_ones() {
    check_reject_texts();
}

fn piece_of(op: u8, body: Body, crlf: bool) -> Piece {
    Piece::Frame { op, body, crlf }
}

fn client(reads: bool) -> Step {
    Step::Connect { source: 0, reads }
}

fn read_on(conn: u8, pieces: Vec<Piece>, split: u16) -> Step {
    Step::Tcp {
        conn,
        pieces,
        split,
    }
}

fn identify(conn: u8, who: &str) -> Step {
    read_on(conn, vec![piece_of(0x01, Body::Name(who.into()), false)], 0)
}

fn advance(ms: u16, sweeps: u8) -> Step {
    Step::Advance { ms, sweeps }
}

/// `0D 0A` ends a frame over TCP, also when a read ends between the two; a lone `0D 0A`
/// is a Who, and only one CR is taken off.
#[test]
fn crlf_ends_a_frame_over_tcp() {
    let r = run(&Scenario {
        settings: plain_settings(),
        steps: vec![
            client(true),
            read_on(
                0,
                vec![
                    piece_of(0x01, Body::Name(b"peq.a.bob".to_vec()), true),
                    piece_of(0x06, Body::Bytes(b"p\r".to_vec()), true),
                    Piece::Raw(b"\r\n".to_vec()),
                ],
                // Between the CR and the 0x0A of the Identify.
                11,
            ),
        ],
    });
    let got = &r.conns[0].0;
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0][0], 0x02, "Session for the CRLF Identify");
    assert_eq!(
        got[1], b"\x07p\r\n",
        "one CR is the line end, the other is data"
    );
    assert!(got[2].starts_with(b"\x0Epeq.a.bob "), "the `0D 0A` Who");
    assert_eq!(got[3], b"\x0C0 1\n");
}

/// A datagram is its own frame: the original server's 17-byte bind (no 0x0A) binds, and
/// a Ping without its 0x0A is answered; a CR is dropped only before a 0x0A.
#[test]
fn a_datagram_needs_no_final_newline() {
    let udp = |pieces, newline| Step::Udp {
        source: 0,
        pieces,
        newline,
    };
    let r = run(&Scenario {
        settings: plain_settings(),
        steps: vec![
            client(true),
            identify(0, "peq.a.bob"),
            udp(vec![piece_of(0x02, Body::Token(0), false)], false),
            udp(
                vec![piece_of(0x06, Body::Bytes(b"u\r".to_vec()), false)],
                false,
            ),
            udp(vec![piece_of(0x06, Body::Bytes(b"v".to_vec()), true)], true),
        ],
    });
    let pongs: Vec<&[u8]> = r.datagrams.iter().map(|(_, d)| &d[..]).collect();
    assert_eq!(pongs, [&b"\x07u\r\n"[..], b"\x07v\n"]);
}

/// A timer fires on the second sweep that finds it run out, not the first; a frame that
/// arrives between the two counts.
#[test]
fn a_timer_fires_on_the_second_sweep() {
    let r = run(&Scenario {
        settings: plain_settings(),
        steps: vec![
            client(true),
            client(true),
            // Both identify deadlines run out; one sweep only flags them.
            advance(100, 1),
            // The first connection identifies in time for the second sweep.
            identify(0, "peq.a.bob"),
            advance(0, 1),
        ],
    });
    assert_eq!(
        r.conns[0].1,
        Some(CloseReason::Eof),
        "saved by its Identify"
    );
    assert_eq!(r.conns[1].1, Some(CloseReason::IdentifyTimeout));
    assert_eq!(r.conns[1].0, [b"\x09identify timeout\n".to_vec()]);
}

/// A client that does not read is cut off once its queued output has made no progress
/// for the write deadline: no Quit, nothing more, and its reader ends with that reason.
#[test]
fn a_client_that_does_not_read_is_cut_at_the_write_deadline() {
    let mut settings = plain_settings();
    settings.write_deadline_ms = 200;
    settings.idle_ms = 5000;
    let ping = piece_of(0x06, Body::Bytes(b"x".to_vec()), false);
    let r = run(&Scenario {
        settings,
        steps: vec![
            client(false),
            identify(0, "peq.a.bob"),
            advance(150, 2),
            // Keeps it from going idle; it still reads nothing.
            read_on(0, vec![ping.clone()], 0),
            advance(50, 2),
            read_on(0, vec![ping], 0),
            Step::Read { conn: 0 },
        ],
    });
    assert_eq!(r.conns[0], (Vec::new(), Some(CloseReason::SlowConsumer)));
}

/// One read of more frames than a slice holds is handled slice by slice, and what the
/// client gets is the same as from many small reads.
#[test]
fn a_long_read_is_handled_in_slices() {
    let pings: Vec<Piece> = (0..3000u16)
        .map(|i| piece_of(0x06, Body::Bytes(i.to_string().into_bytes()), i % 7 == 0))
        .collect();
    let mut settings = plain_settings();
    settings.outbound_limit = 1 << 20;
    let r = run(&Scenario {
        settings,
        steps: vec![client(true), read_on(0, pings, 0)],
    });
    let got = &r.conns[0].0;
    assert_eq!(got.len(), 3000);
    assert_eq!(got[2999], b"\x072999\n");
}

/// A graceful shutdown sends Quit to every connection, identified or not, and refuses
/// new ones.
#[test]
fn shutdown_quits_every_connection() {
    let r = run(&Scenario {
        settings: plain_settings(),
        steps: vec![
            client(true),
            client(true),
            identify(0, "peq.a.bob"),
            Step::Shutdown,
            client(true),
        ],
    });
    assert_eq!(r.conns.len(), 2, "no connection after the shutdown");
    for (got, reason) in &r.conns {
        assert_eq!(got.last().map(Vec::as_slice), Some(&b"\x03\n"[..]));
        assert_eq!(*reason, Some(CloseReason::Shutdown));
    }
}
