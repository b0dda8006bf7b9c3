package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"testing"
	"time"
)

// option builds one option request.
func option(magic uint64, opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// greet connects, reads the greeting and sends the client flags.
func greet(t *testing.T, addr net.Addr, flags uint32) (net.Conn, *bufio.Reader) {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(nc)
	var hello [18]byte
	if _, err := io.ReadFull(br, hello[:]); err != nil {
		t.Fatal(err)
	}
	if got := binary.BigEndian.Uint16(hello[16:]); got != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x", got)
	}
	if _, err := nc.Write(binary.BigEndian.AppendUint32(nil, flags)); err != nil {
		t.Fatal(err)
	}
	return nc, br
}

// TestNegotiationBadInputs: malformed or unsupported options get NBD's
// error replies, and protocol violations close the connection.
func TestNegotiationBadInputs(t *testing.T) {
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", make([]byte, mib))})
	goData := func(name string, nameLen uint32, reqs uint16, extra int) []byte {
		b := binary.BigEndian.AppendUint32(nil, nameLen)
		b = binary.BigEndian.AppendUint16(append(b, name...), reqs)
		return append(b, make([]byte, extra)...)
	}
	tests := []struct {
		name      string
		flags     uint32
		send      []byte
		wantReply uint32 // 0: the server closes the connection instead
	}{
		{"list with data", clientFixed, option(magicOpt, optList, []byte{1}), repErrInvalid},
		{"starttls without TLS configured", clientFixed, option(magicOpt, optStartTLS, nil), repErrPolicy},
		{"go too short", clientFixed, option(magicOpt, optGo, []byte{0, 0}), repErrInvalid},
		{"go name past end", clientFixed, option(magicOpt, optGo, goData("vol00000001", 99, 0, 0)), repErrInvalid},
		{"go request count mismatch", clientFixed, option(magicOpt, optGo, goData("vol00000001", 11, 2, 2)), repErrInvalid},
		{"info unknown export", clientFixed, option(magicOpt, optInfo, goData("vol00000009", 11, 0, 0)), repErrUnknown},
		{"bad option magic", clientFixed, option(0x1234, optList, nil), 0},
		{"oversized option", clientFixed, option(magicOpt, optList, make([]byte, maxOptionLen+1)), 0},
		{"unknown client flags", 1 << 7, nil, 0},
		{"export name unknown", clientFixed, option(magicOpt, optExportName, []byte("vol00000009")), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc, br := greet(t, s.Addr(), tt.flags)
			if _, err := nc.Write(tt.send); err != nil {
				t.Fatal(err)
			}
			var h [20]byte
			_, err := io.ReadFull(br, h[:])
			if tt.wantReply == 0 {
				// EOF, or a reset when unread data was left behind.
				if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("connection not closed: read %v, reply %#x", err, binary.BigEndian.Uint32(h[12:]))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := binary.BigEndian.Uint32(h[12:]); got != tt.wantReply {
				t.Fatalf("reply %#x, want %#x", got, tt.wantReply)
			}
		})
	}
}

// TestExportNameOption: the old NBD_OPT_EXPORT_NAME enters transmission
// with size and flags, padded unless the client asked for no zeroes.
func TestExportNameOption(t *testing.T) {
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", make([]byte, mib)), ReadOnly: true})
	tests := []struct {
		name  string
		flags uint32
		pad   int
	}{{"zeroes", clientFixed, 124}, {"no zeroes", clientFixed | clientNoZeroes, 0}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc, br := greet(t, s.Addr(), tt.flags)
			if _, err := nc.Write(option(magicOpt, optExportName, []byte("vol00000001"))); err != nil {
				t.Fatal(err)
			}
			r := make([]byte, 10+tt.pad)
			if _, err := io.ReadFull(br, r); err != nil {
				t.Fatal(err)
			}
			if size, flags := binary.BigEndian.Uint64(r), binary.BigEndian.Uint16(r[8:]); size != mib || flags&tfReadOnly == 0 {
				t.Fatalf("size %d flags %#x", size, flags)
			}
			c := &wireClient{nc: nc, br: br}
			if errno, got, err := c.cmd(cmdRead, 0, 0, 512, nil); err != nil || errno != 0 || len(got) != 512 {
				t.Fatalf("read: %d %v", errno, err)
			}
		})
	}
}

// TestHandshakeTimeout: a client that never finishes negotiating is
// disconnected after HandshakeTimeout.
func TestHandshakeTimeout(t *testing.T) {
	s := startServerWith(t, Config{HandshakeTimeout: 100 * time.Millisecond})
	_, br := greet(t, s.Addr(), clientFixed)
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("idle negotiating client not disconnected: %v", err)
	}
}

// metaData builds LIST/SET_META_CONTEXT data for name and queries.
func metaData(name string, queries ...string) []byte {
	b := append(binary.BigEndian.AppendUint32(nil, uint32(len(name))), name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = append(binary.BigEndian.AppendUint32(b, uint32(len(q))), q...)
	}
	return b
}

// optReplies reads option replies up to and including the first ACK or
// error, returning their types and the META_CONTEXT names.
func optReplies(t *testing.T, br *bufio.Reader) (types []uint32, contexts []string) {
	t.Helper()
	for {
		var h [20]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			t.Fatal(err)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		body := make([]byte, binary.BigEndian.Uint32(h[16:]))
		if _, err := io.ReadFull(br, body); err != nil {
			t.Fatal(err)
		}
		types = append(types, typ)
		if typ == repMetaContext {
			contexts = append(contexts, string(body[4:]))
		}
		if typ == repAck || typ&(1<<31) != 0 {
			return types, contexts
		}
	}
}

// TestMetaContextOptions: LIST/SET_META_CONTEXT need structured replies
// first, know only base:allocation (listed for no query and for "base:"),
// ignore unknown queries, and refuse malformed data, unknown exports and
// too many queries.
func TestMetaContextOptions(t *testing.T) {
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", make([]byte, mib))})
	tests := []struct {
		name       string
		structured bool
		opt        uint32
		data       []byte
		wantLast   uint32
		wantCtx    []string
	}{
		{"set before structured replies", false, optSetMetaCtx, metaData("vol00000001", metaBaseAlloc), repErrInvalid, nil},
		{"list all", true, optListMetaCtx, metaData("vol00000001"), repAck, []string{metaBaseAlloc}},
		{"list base:", true, optListMetaCtx, metaData("vol00000001", "base:"), repAck, []string{metaBaseAlloc}},
		{"set base:allocation", true, optSetMetaCtx, metaData("vol00000001", metaBaseAlloc), repAck, []string{metaBaseAlloc}},
		{"set base: selects nothing", true, optSetMetaCtx, metaData("vol00000001", "base:"), repAck, nil},
		{"unknown namespace ignored", true, optSetMetaCtx, metaData("vol00000001", "qemu:dirty-bitmap:x"), repAck, nil},
		{"unknown export", true, optSetMetaCtx, metaData("vol00000009", metaBaseAlloc), repErrUnknown, nil},
		{"malformed", true, optSetMetaCtx, metaData("vol00000001", metaBaseAlloc)[:20], repErrInvalid, nil},
		{"too many queries", true, optListMetaCtx, metaData("vol00000001", make([]string, maxMetaQueries+1)...), repErrTooBig, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc, br := greet(t, s.Addr(), clientFixed)
			if tt.structured {
				if _, err := nc.Write(option(magicOpt, optStructuredRepl, nil)); err != nil {
					t.Fatal(err)
				}
				if types, _ := optReplies(t, br); types[0] != repAck {
					t.Fatalf("structured replies: %#x", types)
				}
			}
			if _, err := nc.Write(option(magicOpt, tt.opt, tt.data)); err != nil {
				t.Fatal(err)
			}
			types, ctx := optReplies(t, br)
			if last := types[len(types)-1]; last != tt.wantLast || !slices.Equal(ctx, tt.wantCtx) {
				t.Fatalf("replies %#x contexts %q; want last %#x, contexts %q", types, ctx, tt.wantLast, tt.wantCtx)
			}
		})
	}
}
