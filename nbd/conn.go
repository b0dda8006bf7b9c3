package nbd

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// errProtocol reports a client that broke the protocol; the connection is
// closed.
var errProtocol = errors.New("nbd: protocol violation")

// conn is one client connection.
type conn struct {
	s   *Server
	nc  net.Conn // the TCP connection
	log *slog.Logger
	exp *export // set by attach during NBD_OPT_GO; guarded by Server.mu

	// Negotiation state; rw is nc, or the TLS connection over it.
	rw         net.Conn
	br         *bufio.Reader
	bw         *bufio.Writer // negotiation replies only
	tls        bool
	tlsPending bool   // STARTTLS acknowledged, handshake next
	structured bool   // NBD_OPT_STRUCTURED_REPLY was negotiated
	metaExport string // base:allocation was selected for this export
	metaAlloc  bool

	cb        connBudget // guarded by Server.budget.mu
	closeOnce sync.Once
	wmu       sync.Mutex // serialises transmission replies
}

// newConn wraps an accepted connection.
func newConn(s *Server, nc net.Conn) *conn {
	return &conn{s: s, nc: nc, rw: nc, log: s.log.With("remote", nc.RemoteAddr().String())}
}

// close closes the connection and wakes its reader if it waits for budget.
func (c *conn) close() {
	c.closeOnce.Do(func() {
		c.s.budget.close(&c.cb)
		c.nc.Close()
	})
}

// serve runs the connection to its end.
func (c *conn) serve() {
	defer c.s.wg.Done()
	defer c.s.forget(c)
	defer c.close()
	c.br = bufio.NewReaderSize(c.nc, 64<<10)
	c.bw = bufio.NewWriter(c.nc)
	c.nc.SetDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout))
	e, size, err := c.negotiate()
	if err != nil || e == nil {
		c.logEnd("negotiation", err)
		return
	}
	c.nc.SetDeadline(time.Time{})
	c.log.Debug("nbd client connected", "export", e.spec.Name, "tls", c.tls, "structured", c.structured)
	c.logEnd("transmission", c.transmit(e, size))
}

// logEnd logs how a connection ended: quietly for a clean end or a close
// by the server, as a warning otherwise.
func (c *conn) logEnd(phase string, err error) {
	if err == nil || errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
		c.log.Debug("nbd connection ended", "phase", phase)
		return
	}
	c.log.Warn("nbd connection failed", "phase", phase, "err", err)
}

// negotiate runs the fixed newstyle handshake. It returns the export the
// client chose, attached to c, and its size; a nil export with a nil error
// when the client aborted.
func (c *conn) negotiate() (*export, uint64, error) {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], magicNBD)
	binary.BigEndian.PutUint64(hello[8:], magicOpt)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(hello[:]); err != nil {
		return nil, 0, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return nil, 0, err
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(clientFixed|clientNoZeroes) != 0 {
		return nil, 0, fmt.Errorf("%w: unknown client flags %#x", errProtocol, clientFlags)
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return nil, 0, err
		}
		if binary.BigEndian.Uint64(h[0:]) != magicOpt {
			return nil, 0, fmt.Errorf("%w: bad option magic", errProtocol)
		}
		opt, n := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		if n > maxOptionLen {
			return nil, 0, fmt.Errorf("%w: option %d of %d bytes", errProtocol, opt, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, 0, err
		}
		e, size, done, err := c.option(opt, data, clientFlags&clientNoZeroes != 0)
		if ferr := c.bw.Flush(); err == nil {
			err = ferr
		}
		if err == nil && c.tlsPending {
			err = c.startTLS()
		}
		if err != nil || done {
			return e, size, err
		}
	}
}

// option answers one option. done ends negotiation: with an export for
// transmission, or without one when the client aborted.
func (c *conn) option(opt uint32, data []byte, noZeroes bool) (e *export, size uint64, done bool, err error) {
	if c.s.cfg.RequireTLS && !c.tls {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			return nil, 0, true, fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")
		default:
			return nil, 0, false, c.replyErr(opt, repErrTLSReqd, "TLS is required: send NBD_OPT_STARTTLS")
		}
	}
	switch opt {
	case optExportName:
		// No error reply exists for this option: an unknown name closes.
		e, _, err = c.s.find(c, string(data), true)
		if err != nil {
			return nil, 0, true, fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME %q: %w", data, err)
		}
		if e == nil {
			return nil, 0, true, fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME %q: export unknown", data)
		}
		if size, err = e.b.size(); err != nil {
			return nil, 0, true, err
		}
		var r [10 + 124]byte
		binary.BigEndian.PutUint64(r[0:], size)
		binary.BigEndian.PutUint16(r[8:], flagsFor(e))
		if noZeroes {
			_, err = c.bw.Write(r[:10])
		} else {
			_, err = c.bw.Write(r[:])
		}
		return e, size, true, err
	case optAbort:
		c.reply(opt, repAck, nil) // the client may already be gone
		return nil, 0, true, nil
	case optList:
		if len(data) != 0 {
			return nil, 0, false, c.replyErr(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, sp := range c.s.specs() {
			b := binary.BigEndian.AppendUint32(nil, uint32(len(sp.Name)))
			b = append(append(b, sp.Name...), sp.Description...)
			if err := c.reply(opt, repServer, b); err != nil {
				return nil, 0, false, err
			}
		}
		return nil, 0, false, c.reply(opt, repAck, nil)
	case optStartTLS:
		switch {
		case len(data) != 0:
			return nil, 0, false, c.replyErr(opt, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
		case c.tls:
			return nil, 0, false, c.replyErr(opt, repErrInvalid, "TLS is already on")
		case c.s.cfg.TLS == nil:
			return nil, 0, false, c.replyErr(opt, repErrPolicy, "TLS is not configured")
		}
		c.tlsPending = true // startTLS runs once the ACK is flushed
		return nil, 0, false, c.reply(opt, repAck, nil)
	case optStructuredRepl:
		switch {
		case len(data) != 0:
			return nil, 0, false, c.replyErr(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		case c.structured:
			return nil, 0, false, c.replyErr(opt, repErrInvalid, "structured replies already negotiated")
		}
		c.structured = true
		return nil, 0, false, c.reply(opt, repAck, nil)
	case optListMetaCtx, optSetMetaCtx:
		return nil, 0, false, c.metaContext(opt, data)
	case optInfo, optGo:
		return c.infoGo(opt, data)
	default:
		return nil, 0, false, c.replyErr(opt, repErrUnsup, "option not supported")
	}
}

// startTLS runs the TLS handshake after STARTTLS was acknowledged; the
// negotiation then goes on over TLS, its state reset.
func (c *conn) startTLS() error {
	if c.br.Buffered() != 0 {
		return fmt.Errorf("%w: data after NBD_OPT_STARTTLS before the TLS handshake", errProtocol)
	}
	c.tls, c.tlsPending = true, false
	tc := tls.Server(c.nc, c.s.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	c.rw = tc
	c.br = bufio.NewReaderSize(tc, 64<<10)
	c.bw = bufio.NewWriter(tc)
	c.structured, c.metaAlloc, c.metaExport = false, false, ""
	return nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and SET_META_CONTEXT; the
// only context is base:allocation. SET replaces the selection, also when
// it fails.
func (c *conn) metaContext(opt uint32, data []byte) error {
	if opt == optSetMetaCtx {
		c.metaAlloc, c.metaExport = false, ""
	}
	if !c.structured {
		return c.replyErr(opt, repErrInvalid, "negotiate structured replies first")
	}
	name, queries, ok := parseMeta(data)
	switch {
	case !ok:
		return c.replyErr(opt, repErrInvalid, "malformed request")
	case len(queries) > maxMetaQueries:
		return c.replyErr(opt, repErrTooBig, "too many queries")
	}
	if e, _, _ := c.s.find(c, name, false); e == nil {
		return c.replyErr(opt, repErrUnknown, "export unknown: "+name)
	}
	match := opt == optListMetaCtx && len(queries) == 0
	for _, q := range queries {
		match = match || q == metaBaseAlloc || (opt == optListMetaCtx && q == "base:")
	}
	if match {
		id := uint32(0) // LIST: reserved, zero
		if opt == optSetMetaCtx {
			id, c.metaAlloc, c.metaExport = metaBaseAllocID, true, name
		}
		if err := c.reply(opt, repMetaContext, append(binary.BigEndian.AppendUint32(nil, id), metaBaseAlloc...)); err != nil {
			return err
		}
	}
	return c.reply(opt, repAck, nil)
}

// parseMeta splits meta-context option data: name length, name, query
// count, then each query's length and text.
func parseMeta(data []byte) (string, []string, bool) {
	if len(data) < 8 {
		return "", nil, false
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-8) {
		return "", nil, false
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var qs []string
	for range nq {
		if len(rest) < 4 {
			return "", nil, false
		}
		ql := binary.BigEndian.Uint32(rest)
		if uint64(ql) > uint64(len(rest)-4) {
			return "", nil, false
		}
		qs = append(qs, string(rest[4:4+ql]))
		rest = rest[4+ql:]
	}
	return name, qs, len(rest) == 0
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO; GO attaches c to the export.
func (c *conn) infoGo(opt uint32, data []byte) (*export, uint64, bool, error) {
	name, reqs, ok := parseInfo(data)
	if !ok {
		return nil, 0, false, c.replyErr(opt, repErrInvalid, "malformed request")
	}
	e, spec, err := c.s.find(c, name, opt == optGo)
	if err != nil {
		return nil, 0, false, c.replyErr(opt, repErrPolicy, err.Error())
	}
	if e == nil {
		return nil, 0, false, c.replyErr(opt, repErrUnknown, "export unknown: "+name)
	}
	size, err := e.b.size()
	if err != nil {
		return nil, 0, true, err
	}
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, size)
	info = binary.BigEndian.AppendUint16(info, flagsFor(e))
	if err := c.reply(opt, repInfo, info); err != nil {
		return nil, 0, true, err
	}
	for _, r := range reqs {
		var info []byte
		switch r {
		case infoName:
			info = append(binary.BigEndian.AppendUint16(nil, infoName), name...)
		case infoDescription:
			info = append(binary.BigEndian.AppendUint16(nil, infoDescription), spec.Description...)
		case infoBlockSize:
			info = binary.BigEndian.AppendUint16(nil, infoBlockSize)
			info = binary.BigEndian.AppendUint32(info, 1)
			info = binary.BigEndian.AppendUint32(info, preferredBlock)
			info = binary.BigEndian.AppendUint32(info, maxPayload)
		default:
			continue
		}
		if err := c.reply(opt, repInfo, info); err != nil {
			return nil, 0, true, err
		}
	}
	if err := c.reply(opt, repAck, nil); err != nil {
		return nil, 0, true, err
	}
	if opt == optGo {
		return e, size, true, nil
	}
	return nil, 0, false, nil
}

// parseInfo splits NBD_OPT_INFO/GO data: name length, name, request count,
// requests.
func parseInfo(data []byte) (string, []uint16, bool) {
	if len(data) < 6 {
		return "", nil, false
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-6) {
		return "", nil, false
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nr := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*nr {
		return "", nil, false
	}
	reqs := make([]uint16, nr)
	for i := range reqs {
		reqs[i] = binary.BigEndian.Uint16(rest[2+2*i:])
	}
	return name, reqs, true
}

// flagsFor is the transmission flags word for e. Every connection to an
// export shares one descriptor and nothing is cached in the server, so a
// flush on any connection covers the writes completed on all of them
// (NBD_FLAG_CAN_MULTI_CONN).
func flagsFor(e *export) uint16 {
	f := tfHasFlags | tfSendFlush | tfSendFUA | tfCanMultiConn | tfSendCache
	if e.spec.ReadOnly {
		return f | tfReadOnly
	}
	f |= tfWriteZeroes | tfFastZero
	if e.b.trim {
		f |= tfSendTrim
	}
	return f
}

// reply writes an option reply to the negotiation buffer.
func (c *conn) reply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], magicOptReply)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	if _, err := c.bw.Write(h[:]); err != nil {
		return err
	}
	_, err := c.bw.Write(data)
	return err
}

// replyErr writes an error reply with a human-readable message.
func (c *conn) replyErr(opt, typ uint32, msg string) error {
	return c.reply(opt, typ, []byte(msg))
}
