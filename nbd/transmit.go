package nbd

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
)

// request is one transmission-phase command.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	n      uint32
	data   []byte // write payload
}

// transmit serves commands on export e of the given size until the client
// disconnects or the connection is closed. Up to maxInFlight commands run
// at once; replies may come in any order, as the protocol allows.
func (c *conn) transmit(e *export, size uint64) error {
	sem := make(chan struct{}, maxInFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
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
		switch r.typ {
		case cmdDisc:
			wg.Wait()
			if !e.spec.ReadOnly {
				return e.b.sync()
			}
			return nil
		case cmdWrite:
			if r.n > maxPayload {
				return fmt.Errorf("%w: write of %d bytes", errProtocol, r.n)
			}
			r.data = getBuf(r.n)
			if _, err := io.ReadFull(c.br, r.data); err != nil {
				return err
			}
		}
		if errno := check(e, size, r); errno != 0 {
			putBuf(r.data)
			if err := c.send(r.cookie, errno, nil); err != nil {
				return err
			}
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c.do(e, r)
		}()
	}
}

// check validates a request against the export before it runs: the NBD
// error to reply with, or 0.
func check(e *export, size uint64, r request) uint32 {
	beyond := r.off > size || uint64(r.n) > size-r.off
	switch r.typ {
	case cmdRead:
		if r.n > maxPayload || beyond {
			return errInval
		}
	case cmdWrite, cmdTrim:
		switch {
		case e.spec.ReadOnly:
			return errPerm
		case r.typ == cmdTrim && !e.b.trim:
			return errInval
		case beyond:
			return errNoSpace
		}
	case cmdFlush:
	default:
		return errInval
	}
	return 0
}

// do runs a checked request and sends its reply; a failed send closes the
// connection, which ends transmit.
func (c *conn) do(e *export, r request) {
	var errno uint32
	var out []byte
	switch r.typ {
	case cmdRead:
		out = getBuf(r.n)
		defer putBuf(out)
		if _, err := e.b.f.ReadAt(out, int64(r.off)); err != nil {
			c.log.Warn("nbd read", "export", e.spec.Name, "err", err)
			errno, out = errIO, nil
		}
		c.s.stats.read.Add(uint64(len(out)))
	case cmdWrite:
		n, err := e.b.f.WriteAt(r.data, int64(r.off))
		c.s.stats.written.Add(uint64(n))
		putBuf(r.data)
		errno = c.ioErr(e, "write", err, r.flags)
	case cmdTrim:
		errno = c.ioErr(e, "trim", e.b.discard(r.off, uint64(r.n)), r.flags)
	case cmdFlush:
		errno = c.ioErr(e, "flush", e.b.sync(), 0)
	}
	if err := c.send(r.cookie, errno, out); err != nil {
		c.nc.Close()
	}
}

// ioErr maps the outcome of a write-side operation, after a sync when the
// client asked for FUA, to an NBD error.
func (c *conn) ioErr(e *export, op string, err error, flags uint16) uint32 {
	if err == nil && flags&cmdFlagFUA != 0 {
		err = e.b.sync()
	}
	if err != nil {
		c.log.Warn("nbd "+op, "export", e.spec.Name, "err", err)
		return errIO
	}
	return 0
}

// send writes a simple reply, with data for a successful read.
func (c *conn) send(cookie uint64, errno uint32, data []byte) error {
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], magicSimpleRep)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], cookie)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	bufs := net.Buffers{h[:], data}
	_, err := bufs.WriteTo(c.nc)
	return err
}

// getBuf returns an n-byte buffer, pooled when n <= poolBuf.
func getBuf(n uint32) []byte {
	if n > poolBuf {
		return make([]byte, n)
	}
	return (*bufPool.Get().(*[]byte))[:n]
}

// putBuf returns a buffer from getBuf to the pool.
func putBuf(b []byte) {
	if cap(b) == poolBuf {
		b = b[:poolBuf]
		bufPool.Put(&b)
	}
}
