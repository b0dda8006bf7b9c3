package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// maxInFlight bounds the requests one connection works on at once.
const maxInFlight = 16

// poolBuf is the size of pooled request buffers; larger requests allocate.
const poolBuf = 1 << 20

var bufPool = sync.Pool{New: func() any { b := make([]byte, poolBuf); return &b }}

// errProtocol reports a client that broke the protocol; the connection is
// closed.
var errProtocol = errors.New("nbd: protocol violation")

// conn is one client connection.
type conn struct {
	s   *Server
	nc  net.Conn
	log *slog.Logger
	br  *bufio.Reader
	bw  *bufio.Writer // negotiation replies only
	exp *export       // set by attach during NBD_OPT_GO; guarded by Server.mu

	wmu sync.Mutex // serialises transmission replies
}

// serve runs the connection to its end.
func (c *conn) serve() {
	defer c.s.wg.Done()
	defer c.s.forget(c)
	defer c.nc.Close()
	c.br = bufio.NewReaderSize(c.nc, 64<<10)
	c.bw = bufio.NewWriter(c.nc)
	c.nc.SetDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout))
	e, size, err := c.negotiate()
	if err != nil || e == nil {
		c.logEnd("negotiation", err)
		return
	}
	c.nc.SetDeadline(time.Time{})
	c.log.Debug("nbd client connected", "export", e.spec.Name)
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
		if err != nil || done {
			return e, size, err
		}
	}
}

// option answers one option. done ends negotiation: with an export for
// transmission, or without one when the client aborted.
func (c *conn) option(opt uint32, data []byte, noZeroes bool) (e *export, size uint64, done bool, err error) {
	switch opt {
	case optExportName:
		// No error reply exists for this option: an unknown name closes.
		if e, _ = c.s.find(c, string(data), true); e == nil {
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
	case optInfo, optGo:
		return c.infoGo(opt, data)
	default:
		return nil, 0, false, c.replyErr(opt, repErrUnsup, "option not supported")
	}
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO; GO attaches c to the export.
func (c *conn) infoGo(opt uint32, data []byte) (*export, uint64, bool, error) {
	name, reqs, ok := parseInfo(data)
	if !ok {
		return nil, 0, false, c.replyErr(opt, repErrInvalid, "malformed request")
	}
	e, spec := c.s.find(c, name, opt == optGo)
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

// flagsFor is the transmission flags word for e.
func flagsFor(e *export) uint16 {
	f := tfHasFlags | tfSendFlush | tfSendFUA | tfCanMultiConn
	if e.spec.ReadOnly {
		f |= tfReadOnly
	}
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
