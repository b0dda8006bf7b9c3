package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// maxInFlight bounds the requests one connection works on at once.
	maxInFlight = 64
	// chunkSize is the largest buffer one request holds: a longer read is
	// sent in pieces of this size, a longer write is written as it arrives.
	chunkSize = 2 << 20
)

// request is one transmission-phase command.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	n      uint32
}

// flagsAllowed is the command flags each command accepts.
var flagsAllowed = map[uint16]uint16{
	cmdRead:        0,
	cmdWrite:       cmdFlagFUA,
	cmdFlush:       0,
	cmdTrim:        cmdFlagFUA,
	cmdCache:       0,
	cmdWriteZeroes: cmdFlagFUA | cmdFlagNoHole | cmdFlagFastZero,
	cmdBlockStatus: cmdFlagReqOne,
}

// transmit serves commands on export e of the given size until the client
// disconnects or the connection is closed. Up to maxInFlight commands run
// at once, their buffers within the server's budget; replies go out in
// any order, as the protocol allows.
func (c *conn) transmit(e *export, size uint64) (err error) {
	slots := make(chan struct{}, maxInFlight)
	var wg sync.WaitGroup
	defer func() {
		if err != nil {
			c.close()
		}
		wg.Wait()
	}()
	var h [28]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint32(h[0:]) != magicRequest {
			return fmt.Errorf("%w: bad request magic", errProtocol)
		}
		r := request{
			flags:  binary.BigEndian.Uint16(h[4:]),
			typ:    binary.BigEndian.Uint16(h[6:]),
			cookie: binary.BigEndian.Uint64(h[8:]),
			off:    binary.BigEndian.Uint64(h[16:]),
			n:      binary.BigEndian.Uint32(h[24:]),
		}
		if r.typ == cmdDisc {
			// Finish what is in flight and hang up; then write the data
			// out, without the client waiting for it (durability is what
			// flush and FUA promise, but a client that forgot them should
			// not lose data).
			wg.Wait()
			c.close()
			if !e.spec.ReadOnly {
				return e.b.sync()
			}
			return nil
		}
		if r.typ == cmdWrite && r.n > maxPayload {
			// Checked before anything is read or allocated.
			return fmt.Errorf("%w: write of %d bytes over the %d maximum", errProtocol, r.n, maxPayload)
		}
		if errno, msg := c.check(e, size, r); errno != 0 {
			if r.typ == cmdWrite {
				if _, err := io.CopyN(io.Discard, c.br, int64(r.n)); err != nil {
					return err
				}
			}
			if err := c.sendErr(r, errno, msg); err != nil {
				return err
			}
			continue
		}
		slots <- struct{}{}
		var g grant
		var buf []byte
		switch {
		case r.typ == cmdRead && r.n > 0, r.typ == cmdWrite && r.n > 0:
			var ok bool
			if g, ok = c.s.budget.acquire(&c.cb, int64(min(r.n, chunkSize))); !ok {
				return net.ErrClosed
			}
			if r.typ == cmdWrite || !c.zeroCopy() {
				buf = getBuf(min(r.n, chunkSize))
			}
		}
		if r.typ == cmdWrite {
			if r.n > chunkSize {
				err := c.writeLarge(e, r, buf)
				putBuf(buf)
				c.s.budget.release(&c.cb, g)
				<-slots
				if err != nil {
					return err
				}
				continue
			}
			if _, err := io.ReadFull(c.br, buf); err != nil {
				putBuf(buf)
				c.s.budget.release(&c.cb, g)
				return err
			}
		}
		wg.Go(func() {
			defer func() { <-slots }()
			defer c.s.budget.release(&c.cb, g)
			defer putBuf(buf)
			if err := c.do(e, r, buf); err != nil {
				c.logEnd("transmission", err)
				c.close()
			}
		})
	}
}

// check validates a request against the export before it runs: the NBD
// error to reply with and a message, or 0.
func (c *conn) check(e *export, size uint64, r request) (uint32, string) {
	allowed, known := flagsAllowed[r.typ]
	beyond := r.off > size || uint64(r.n) > size-r.off
	switch {
	case !known:
		return errInval, fmt.Sprintf("unknown command %d", r.typ)
	case r.flags&^allowed != 0:
		return errInval, fmt.Sprintf("command flags %#x not allowed", r.flags)
	}
	switch r.typ {
	case cmdRead:
		if r.n > maxPayload {
			return errInval, "read longer than the maximum block size"
		}
		if beyond {
			return errInval, "read beyond the end of the export"
		}
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		switch {
		case e.spec.ReadOnly:
			return errPerm, "the export is read-only"
		case r.typ == cmdTrim && !e.b.trim:
			return errInval, "trim is not supported here"
		case beyond:
			return errNoSpace, "beyond the end of the export"
		}
	case cmdCache:
		if beyond {
			return errInval, "beyond the end of the export"
		}
	case cmdBlockStatus:
		switch {
		case !c.metaAlloc || c.metaExport != e.spec.Name:
			return errInval, "no metadata context selected"
		case r.n == 0 || beyond:
			return errInval, "empty or beyond the end of the export"
		}
	}
	return 0, ""
}

// do runs a checked request and sends its reply; an error means the
// connection cannot go on (a failed send, or a read that failed after
// part of it was sent).
func (c *conn) do(e *export, r request, buf []byte) error {
	var err error
	fua := r.flags&cmdFlagFUA != 0
	switch r.typ {
	case cmdRead:
		return c.read(e, r, buf)
	case cmdBlockStatus:
		return c.blockStatus(e, r)
	case cmdWrite:
		err = e.b.writeAt(buf, int64(r.off), fua)
		if err == nil {
			c.s.stats.written.Add(uint64(len(buf)))
		}
	case cmdTrim:
		if r.n > 0 {
			err = syncAfter(e, fua, e.b.discard(r.off, uint64(r.n)))
		}
	case cmdWriteZeroes:
		if r.n > 0 {
			err = syncAfter(e, fua, e.b.zero(r.off, uint64(r.n), r.flags&cmdFlagNoHole != 0, r.flags&cmdFlagFastZero != 0))
		}
	case cmdFlush:
		err = e.b.sync()
	case cmdCache:
		err = e.b.cache(r.off, uint64(r.n))
	}
	switch {
	case err == nil:
		return c.sendSimple(r.cookie, 0, nil)
	case errors.Is(err, errSlowZero):
		return c.sendErr(r, errNotSup, "zeroing here would not be faster than writing")
	default:
		c.log.Warn("nbd request failed", "export", e.spec.Name, "command", r.typ, "err", err)
		return c.sendErr(r, errIO, err.Error())
	}
}

// syncAfter syncs the export after a successful operation when FUA asks.
func syncAfter(e *export, fua bool, err error) error {
	if err == nil && fua {
		err = e.b.sync()
	}
	return err
}

// writeLarge writes a request longer than chunkSize as its payload
// arrives, one buffer at a time, then replies; the payload is consumed
// even when writing fails.
func (c *conn) writeLarge(e *export, r request, buf []byte) error {
	var werr error
	off, left := int64(r.off), int64(r.n)
	for left > 0 {
		p := buf[:min(left, int64(len(buf)))]
		if _, err := io.ReadFull(c.br, p); err != nil {
			return err
		}
		if werr == nil {
			werr = e.b.writeAt(p, off, false)
		}
		off, left = off+int64(len(p)), left-int64(len(p))
	}
	werr = syncAfter(e, r.flags&cmdFlagFUA != 0, werr)
	if werr != nil {
		c.log.Warn("nbd write failed", "export", e.spec.Name, "err", werr)
		return c.sendErr(r, errIO, werr.Error())
	}
	return c.sendSimple(r.cookie, 0, nil)
}

// read answers a read. Over plain TCP with structured replies the data
// goes out with sendfile, from the page cache to the socket with no copy
// through user space and no buffer: readahead for the range is started
// first, so several reads still wait on the device at once, and the one
// OFFSET_DATA chunk is sent under the write lock (a failure in the middle
// of it closes the connection: the chunk is never complete, so the
// client cannot take it for data). Otherwise (TLS, or simple replies) the
// data is read into buf first. With structured replies each buffer-full
// is then its own OFFSET_DATA chunk, so a failure is reported
// (ERROR_OFFSET) and other replies interleave. With simple replies the
// first buffer-full is read before the reply starts (a failure there gets
// EIO); the rest follows with sendfile on plain TCP, and a failure in it
// closes the connection, as the protocol requires. The bytes are counted
// before the reply carrying them goes out, so a client that has its data
// finds it in Stats.
func (c *conn) read(e *export, r request, buf []byte) error {
	off, left := int64(r.off), int64(r.n)
	if !c.structured {
		k := min(left, int64(len(buf)))
		if _, err := e.b.f.ReadAt(buf[:k], off); err != nil {
			c.log.Warn("nbd read failed", "export", e.spec.Name, "err", err)
			return c.sendSimple(r.cookie, errIO, nil)
		}
		c.s.stats.read.Add(uint64(left))
		if k == left {
			return c.sendSimple(r.cookie, 0, buf[:k])
		}
		c.lockWrite()
		defer c.wmu.Unlock()
		if err := c.writeLocked(simpleHeader(r.cookie, 0), buf[:k]); err != nil {
			return err
		}
		return c.streamLocked(e, off+k, left-k, buf)
	}
	if left == 0 {
		return c.sendChunk(r.cookie, replyFlagDone, replyNone, nil)
	}
	if buf == nil {
		_ = e.b.cache(r.off, uint64(r.n))
		c.s.stats.read.Add(uint64(left))
		h := chunkHeader(r.cookie, replyFlagDone, replyOffsetData, 8+int(r.n))
		c.lockWrite()
		defer c.wmu.Unlock()
		if err := c.writeLocked(h, binary.BigEndian.AppendUint64(nil, r.off)); err != nil {
			return err
		}
		return sendfile(c.rw.(*net.TCPConn), e.b.fd(), off, left)
	}
	for left > 0 {
		k := min(left, int64(len(buf)))
		if _, err := e.b.f.ReadAt(buf[:k], off); err != nil {
			c.log.Warn("nbd read failed", "export", e.spec.Name, "err", err)
			p := binary.BigEndian.AppendUint64(errorPayload(errIO, err.Error()), uint64(off))
			return c.sendChunk(r.cookie, replyFlagDone, replyErrorOffset, p)
		}
		var flags uint16
		if k == left {
			flags = replyFlagDone
		}
		c.s.stats.read.Add(uint64(k))
		if err := c.sendChunk(r.cookie, flags, replyOffsetData, binary.BigEndian.AppendUint64(nil, uint64(off)), buf[:k]); err != nil {
			return err
		}
		off, left = off+k, left-k
	}
	return nil
}

// streamLocked sends n bytes of the export from off, c.wmu held: with
// sendfile on plain TCP (no copy through user space), else through buf.
func (c *conn) streamLocked(e *export, off, n int64, buf []byte) error {
	if tc, ok := c.rw.(*net.TCPConn); ok {
		return sendfile(tc, e.b.fd(), off, n)
	}
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := e.b.f.ReadAt(buf[:k], off); err != nil {
			return fmt.Errorf("nbd: read after the reply began: %w", err)
		}
		if _, err := c.rw.Write(buf[:k]); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// sendfile copies n bytes of fd from off to the socket.
func sendfile(tc *net.TCPConn, fd int, off, n int64) error {
	rc, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Write(func(s uintptr) bool {
		for n > 0 {
			k, err := unix.Sendfile(int(s), fd, &off, int(min(n, 1<<30)))
			if k > 0 {
				n -= int64(k)
			}
			switch {
			case err == unix.EAGAIN:
				return false // wait until the socket is writable
			case err == unix.EINTR:
			case err != nil:
				serr = fmt.Errorf("nbd: sendfile: %w", err)
				return true
			case k == 0:
				serr = fmt.Errorf("nbd: sendfile: %w", io.ErrUnexpectedEOF)
				return true
			}
		}
		return true
	})
	return errors.Join(err, serr)
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (c *conn) blockStatus(e *export, r request) error {
	ext, err := e.b.extents(r.off, r.n)
	if err != nil {
		c.log.Warn("nbd block status failed", "export", e.spec.Name, "err", err)
		return c.sendErr(r, errIO, err.Error())
	}
	if r.flags&cmdFlagReqOne != 0 {
		ext = ext[:1]
	}
	p := binary.BigEndian.AppendUint32(make([]byte, 0, 4+8*len(ext)), metaBaseAllocID)
	for _, x := range ext {
		p = binary.BigEndian.AppendUint32(p, x.length)
		p = binary.BigEndian.AppendUint32(p, x.flags)
	}
	return c.sendChunk(r.cookie, replyFlagDone, replyBlockStatus, p)
}

// simpleHeader is a simple reply's header.
func simpleHeader(cookie uint64, errno uint32) []byte {
	h := binary.BigEndian.AppendUint32(make([]byte, 0, 16), magicSimpleRep)
	h = binary.BigEndian.AppendUint32(h, errno)
	return binary.BigEndian.AppendUint64(h, cookie)
}

// sendSimple writes a simple reply, with data for a successful read.
func (c *conn) sendSimple(cookie uint64, errno uint32, data []byte) error {
	c.lockWrite()
	defer c.wmu.Unlock()
	return c.writeLocked(simpleHeader(cookie, errno), data)
}

// sendChunk writes one structured reply chunk whose payload is parts.
func (c *conn) sendChunk(cookie uint64, flags, typ uint16, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	h := chunkHeader(cookie, flags, typ, n)
	c.lockWrite()
	defer c.wmu.Unlock()
	return c.writeLocked(append([][]byte{h}, parts...)...)
}

// chunkHeader is a structured reply chunk's header for n payload bytes.
func chunkHeader(cookie uint64, flags, typ uint16, n int) []byte {
	h := binary.BigEndian.AppendUint32(make([]byte, 0, 20), magicStructured)
	h = binary.BigEndian.AppendUint16(h, flags)
	h = binary.BigEndian.AppendUint16(h, typ)
	h = binary.BigEndian.AppendUint64(h, cookie)
	return binary.BigEndian.AppendUint32(h, uint32(n))
}

// zeroCopy reports whether reads go out with sendfile and no buffer:
// structured replies over plain TCP.
func (c *conn) zeroCopy() bool {
	_, tcp := c.rw.(*net.TCPConn)
	return tcp && c.structured
}

// sendErr replies with an error: a structured NBD_REPLY_TYPE_ERROR with
// msg when structured replies were negotiated, else a simple reply.
func (c *conn) sendErr(r request, errno uint32, msg string) error {
	if !c.structured {
		return c.sendSimple(r.cookie, errno, nil)
	}
	return c.sendChunk(r.cookie, replyFlagDone, replyError, errorPayload(errno, msg))
}

// errorPayload is the start of an error chunk's payload: errno, then msg
// (cut to maxErrMsg bytes) with its length.
func errorPayload(errno uint32, msg string) []byte {
	msg = msg[:min(len(msg), maxErrMsg)]
	p := binary.BigEndian.AppendUint32(make([]byte, 0, 6+len(msg)+8), errno)
	p = binary.BigEndian.AppendUint16(p, uint16(len(msg)))
	return append(p, msg...)
}

// lockWrite takes c.wmu for one reply and gives its writes
// Config.WriteTimeout: a client that does not read is cut, not waited for.
func (c *conn) lockWrite() {
	c.wmu.Lock()
	c.nc.SetWriteDeadline(time.Now().Add(c.s.cfg.WriteTimeout))
}

// writeLocked writes parts as one vectored write; c.wmu is held.
func (c *conn) writeLocked(parts ...[]byte) error {
	bufs := net.Buffers(parts)
	_, err := bufs.WriteTo(c.rw)
	return err
}

// bufClasses are the pooled buffer sizes, up to chunkSize.
var bufClasses = [...]int{64 << 10, 256 << 10, 1 << 20, chunkSize}

// bufPools holds one pool per class in bufClasses.
var bufPools [len(bufClasses)]sync.Pool

// getBuf returns an n-byte buffer (n <= chunkSize) from the smallest
// class that fits; nil for n == 0.
func getBuf(n uint32) []byte {
	if n == 0 {
		return nil
	}
	for i, size := range bufClasses {
		if int(n) <= size {
			if b, ok := bufPools[i].Get().(*[]byte); ok {
				return (*b)[:n]
			}
			return make([]byte, n, size)
		}
	}
	panic("nbd: buffer over chunkSize")
}

// putBuf returns a buffer from getBuf to its pool.
func putBuf(b []byte) {
	for i, size := range bufClasses {
		if cap(b) == size {
			b = b[:size]
			bufPools[i].Put(&b)
			return
		}
	}
}
