package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// pipeClient is a wire client that sends many requests without waiting
// and reads the replies as they come, simple or structured.
type pipeClient struct {
	nc         net.Conn
	br         *bufio.Reader
	structured bool
}

// dialPipe connects to name, negotiating structured replies and
// base:allocation when structured is set.
func dialPipe(t *testing.T, addr net.Addr, name string, structured bool) *pipeClient {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	c := &pipeClient{nc: nc, br: bufio.NewReaderSize(nc, 1<<20), structured: structured}
	if _, err := io.ReadFull(c.br, make([]byte, 18)); err != nil {
		t.Fatal(err)
	}
	msg := binary.BigEndian.AppendUint32(nil, clientFixed|clientNoZeroes)
	nameData := append(binary.BigEndian.AppendUint32(nil, uint32(len(name))), name...)
	var opts [][2]any
	if structured {
		meta := binary.BigEndian.AppendUint32(append([]byte(nil), nameData...), 1)
		meta = append(binary.BigEndian.AppendUint32(meta, uint32(len(metaBaseAlloc))), metaBaseAlloc...)
		opts = append(opts, [2]any{optStructuredRepl, []byte(nil)}, [2]any{optSetMetaCtx, meta})
	}
	opts = append(opts, [2]any{optGo, binary.BigEndian.AppendUint16(append([]byte(nil), nameData...), 0)})
	for _, o := range opts {
		data := o[1].([]byte)
		msg = binary.BigEndian.AppendUint64(msg, magicOpt)
		msg = binary.BigEndian.AppendUint32(msg, o[0].(uint32))
		msg = append(binary.BigEndian.AppendUint32(msg, uint32(len(data))), data...)
	}
	if _, err := nc.Write(msg); err != nil {
		t.Fatal(err)
	}
	for acks := 0; acks < len(opts); {
		var h [20]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			t.Fatal(err)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		if _, err := io.CopyN(io.Discard, c.br, int64(binary.BigEndian.Uint32(h[16:]))); err != nil {
			t.Fatal(err)
		}
		if typ&(1<<31) != 0 {
			t.Fatalf("option %d: error reply %#x", binary.BigEndian.Uint32(h[8:]), typ)
		}
		if typ == repAck {
			acks++
		}
	}
	return c
}

// send writes one request.
func (c *pipeClient) send(typ, flags uint16, cookie, off uint64, n uint32, data []byte) error {
	h := binary.BigEndian.AppendUint32(nil, magicRequest)
	h = binary.BigEndian.AppendUint16(h, flags)
	h = binary.BigEndian.AppendUint16(h, typ)
	h = binary.BigEndian.AppendUint64(h, cookie)
	h = binary.BigEndian.AppendUint64(h, off)
	h = binary.BigEndian.AppendUint32(h, n)
	bufs := net.Buffers{h, data}
	_, err := bufs.WriteTo(c.nc)
	return err
}

// reply is one reply message (a simple reply or one structured chunk).
type reply struct {
	cookie  uint64
	errno   uint32
	done    bool
	typ     uint16
	off     uint64 // OFFSET_DATA: where data starts
	data    []byte // read data, or the BLOCK_STATUS payload
	errText string
}

// next reads one reply message; pending says how long each pending read
// is, for simple replies that carry data.
func (c *pipeClient) next(pending func(cookie uint64) (n uint32, isRead bool)) (reply, error) {
	var m [4]byte
	if _, err := io.ReadFull(c.br, m[:]); err != nil {
		return reply{}, err
	}
	switch binary.BigEndian.Uint32(m[:]) {
	case magicSimpleRep:
		var h [12]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return reply{}, err
		}
		r := reply{errno: binary.BigEndian.Uint32(h[:]), cookie: binary.BigEndian.Uint64(h[4:]), done: true}
		if n, isRead := pending(r.cookie); isRead && r.errno == 0 {
			r.data = make([]byte, n)
			if _, err := io.ReadFull(c.br, r.data); err != nil {
				return reply{}, err
			}
		}
		return r, nil
	case magicStructured:
		var h [16]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return reply{}, err
		}
		r := reply{done: binary.BigEndian.Uint16(h[:])&replyFlagDone != 0, typ: binary.BigEndian.Uint16(h[2:]),
			cookie: binary.BigEndian.Uint64(h[4:])}
		p := make([]byte, binary.BigEndian.Uint32(h[12:]))
		if _, err := io.ReadFull(c.br, p); err != nil {
			return reply{}, err
		}
		switch r.typ {
		case replyOffsetData:
			r.off, r.data = binary.BigEndian.Uint64(p), p[8:]
		case replyBlockStatus:
			r.data = p
		case replyError, replyErrorOffset:
			r.errno = binary.BigEndian.Uint32(p)
			r.errText = string(p[6 : 6+binary.BigEndian.Uint16(p[4:])])
		}
		return r, nil
	default:
		return reply{}, fmt.Errorf("bad reply magic %#x", m)
	}
}

// TestOutOfOrderUnderLoad: four connections at once, each with hundreds
// of pipelined requests (reads from 512 bytes to 32 MiB, writes, flushes,
// block status), in simple and structured mode: every request gets
// exactly one complete reply with the right data, replies do come out of
// order (small reads overtake 32 MiB ones), and the data written is then
// read back.
func TestOutOfOrderUnderLoad(t *testing.T) {
	const size = 128 * mib
	const readArea = 64 * mib // reads only; writes go to one 16 MiB area per connection
	orig := pattern(size, 21)
	s := startServer(t)
	var reordered sync.Map
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", orig)})
			var wg sync.WaitGroup
			for conn := range 4 {
				wg.Go(func() { loadConn(t, s, structured, conn, orig, readArea, &reordered) })
			}
			wg.Wait()
		})
	}
	n := 0
	reordered.Range(func(_, v any) bool { n += v.(int); return true })
	t.Logf("replies out of request order: %d", n)
	if n == 0 {
		t.Error("no reply overtook an earlier request: requests are not run concurrently")
	}
}

// loadConn runs one connection's share of TestOutOfOrderUnderLoad.
func loadConn(t *testing.T, s *Server, structured bool, conn int, orig []byte, readArea uint64, reordered *sync.Map) {
	c := dialPipe(t, s.Addr(), "vol00000001", structured)
	rng := rand.New(rand.NewPCG(uint64(conn), 7))
	type req struct {
		typ    uint16
		off    uint64
		n      uint32
		want   []byte
		got    []byte
		filled uint32
		done   bool
	}
	var mu sync.Mutex
	reqs := map[uint64]*req{}
	written := bytes.Clone(orig[readArea+uint64(conn)*16*mib : readArea+uint64(conn+1)*16*mib])
	const count = 300
	errc := make(chan error, 1)
	go func() {
		slot := uint64(0)
		for cookie := uint64(1); cookie <= count; cookie++ {
			r := &req{}
			switch k := rng.IntN(20); {
			case k == 0:
				r.typ, r.off, r.n = cmdRead, 0, maxPayload
			case k < 11:
				r.typ, r.n = cmdRead, uint32(512<<rng.IntN(14)) // 512 B .. 4 MiB
				r.off = rng.Uint64N(readArea - uint64(r.n))
			case k < 17 && slot < 16*mib/(128<<10):
				// Each write has its own 128 KiB slot: writes in flight
				// together never overlap, so their order does not matter.
				r.typ, r.n = cmdWrite, uint32(4096<<rng.IntN(6))
				r.off = slot * (128 << 10)
				slot++
				data := pattern(int(r.n), byte(cookie))
				copy(written[r.off:], data)
				r.want, r.off = data, r.off+readArea+uint64(conn)*16*mib
			case k < 18, k < 17:
				r.typ = cmdFlush
			default:
				if !structured {
					r.typ = cmdFlush
					break
				}
				r.typ, r.off, r.n = cmdBlockStatus, rng.Uint64N(readArea), 4096
			}
			if r.typ == cmdRead {
				r.want = orig[r.off : r.off+uint64(r.n)] // got is made when its data comes
			}
			mu.Lock()
			reqs[cookie] = r
			mu.Unlock()
			var payload []byte
			if r.typ == cmdWrite {
				payload = r.want
			}
			if err := c.send(r.typ, 0, cookie, r.off, r.n, payload); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	pending := func(cookie uint64) (uint32, bool) {
		mu.Lock()
		defer mu.Unlock()
		if r := reqs[cookie]; r != nil && r.typ == cmdRead {
			return r.n, true
		}
		return 0, false
	}
	last, out := uint64(0), 0
	for done := 0; done < count; {
		rep, err := c.next(pending)
		if err != nil {
			t.Errorf("conn %d: after %d replies: %v", conn, done, err)
			return
		}
		mu.Lock()
		r := reqs[rep.cookie]
		mu.Unlock()
		switch {
		case r == nil || r.done:
			t.Errorf("conn %d: reply for cookie %d, which is not pending", conn, rep.cookie)
			return
		case rep.errno != 0:
			t.Errorf("conn %d: request %d (type %d off %d len %d): error %d %s", conn, rep.cookie, r.typ, r.off, r.n, rep.errno, rep.errText)
			return
		}
		switch {
		case r.typ == cmdRead && !structured:
			r.got, r.filled = rep.data, r.n
		case r.typ == cmdRead && rep.typ == replyOffsetData:
			if r.got == nil {
				r.got = make([]byte, r.n)
			}
			copy(r.got[rep.off-r.off:], rep.data)
			r.filled += uint32(len(rep.data))
		case r.typ == cmdBlockStatus && rep.typ == replyBlockStatus:
			if len(rep.data) < 12 || binary.BigEndian.Uint32(rep.data) != metaBaseAllocID {
				t.Errorf("conn %d: block status payload %x", conn, rep.data)
			}
		}
		if !rep.done {
			continue
		}
		r.done, done = true, done+1
		if r.typ == cmdRead && (r.filled != r.n || !bytes.Equal(r.got, r.want)) {
			t.Errorf("conn %d: read %d at %d len %d: %d bytes came, equal %v", conn, rep.cookie, r.off, r.n, r.filled, bytes.Equal(r.got, r.want))
		}
		// Only the replies in flight hold memory (up to 32 MiB each).
		r.got, r.want = nil, nil
		if rep.cookie < last {
			out++
		}
		last = max(last, rep.cookie)
	}
	if err := <-errc; err != nil {
		t.Errorf("conn %d: send: %v", conn, err)
	}
	reordered.Store(fmt.Sprint(structured, conn), out)
	// Read the written area back on a fresh, synchronous client.
	w, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Error(err)
		return
	}
	base := readArea + uint64(conn)*16*mib
	for off := uint64(0); off < 16*mib; off += 4 * mib {
		errno, got, err := w.cmd(cmdRead, 0, base+off, 4*mib, nil)
		if err != nil || errno != 0 || !bytes.Equal(got, written[off:off+4*mib]) {
			t.Errorf("conn %d: written area at %d: errno %d err %v equal %v", conn, off, errno, err, bytes.Equal(got, written[off:off+4*mib]))
		}
	}
}
