package state

import (
	"bytes"
	"encoding/binary"
	"time"
	"unicode/utf8"

	"github.com/volumed/volumed/commands"
)

// scannedOp is what scanIndexed reads of an operation's JSON record: the
// indexed fields of kvIndexed, its strings as pieces of the record.
type scannedOp struct {
	typ, status, volume, vm, by []byte
	hasVM                       bool // vm_id is not null
	created, updated, completed time.Time
	hasCompleted                bool // completed_at is not null
}

// fields returns what the index keeps of the operation o holds.
func (o *scannedOp) fields() opFields[[]byte] {
	f := opFields[[]byte]{typ: o.typ, status: o.status, volume: o.volume, by: o.by}
	if o.hasVM {
		f.vm = o.vm
	}
	times := commands.Operation{Status: commands.OpStatus(o.status), CreatedAt: o.created, UpdatedAt: o.updated}
	if o.hasCompleted {
		times.CompletedAt = &o.completed
	}
	f.created, f.completed, f.duration = opTimes(&times)
	return f
}

// scanIndexed sets *o to what encoding/json decodes from raw into a zero
// kvIndexed, reading only the indexed fields and checking that the rest
// is valid JSON, several times faster. It reports false when it is not
// sure to agree with encoding/json (o is then undefined): raw is invalid,
// or not an object, or has a key with an escape or a byte beyond ASCII, a
// key differing from an indexed field's only in case (which encoding/json
// matches), an indexed field of another type than its own or null, a kept
// string with an escape or invalid UTF-8, a time encoding/json refuses, or
// nesting deeper than scanMaxDepth. The caller then decodes raw with
// encoding/json, which also says what is wrong.
func scanIndexed(raw []byte, o *scannedOp) bool {
	*o = scannedOp{}
	s := jsonScanner{b: raw}
	s.space()
	if !s.eat('{') {
		return false
	}
	s.space()
	if s.eat('}') {
		return s.end()
	}
	for {
		s.space()
		key, ok := s.plainString()
		if !ok {
			return false
		}
		s.space()
		if !s.eat(':') {
			return false
		}
		s.space()
		if !s.field(key, o) {
			return false
		}
		s.space()
		if s.eat(',') {
			continue
		}
		if s.eat('}') {
			return s.end()
		}
		return false
	}
}

// scanMaxDepth bounds the nesting scanIndexed follows (encoding/json's is
// 10,000); a record nesting deeper is decoded by encoding/json.
const scanMaxDepth = 64

// jsonScanner reads JSON from b at i.
type jsonScanner struct {
	b []byte
	i int
}

// field reads the value of key into o if key is an indexed field's name,
// and checks it otherwise.
func (s *jsonScanner) field(key []byte, o *scannedOp) bool {
	switch string(key) {
	case "type":
		return s.keptString(&o.typ)
	case "status":
		return s.keptString(&o.status)
	case "volume_id":
		return s.keptString(&o.volume)
	case "requested_by":
		return s.keptString(&o.by)
	case "vm_id":
		// A pointer: null sets it to nil.
		if o.hasVM = !s.null(); o.hasVM {
			o.vm = nil
			return s.keptString(&o.vm)
		}
		return true
	case "created_at":
		return s.time(&o.created)
	case "updated_at":
		return s.time(&o.updated)
	case "completed_at":
		if o.hasCompleted = !s.null(); o.hasCompleted {
			o.completed = time.Time{}
			return s.time(&o.completed)
		}
		return true
	}
	if mayMatchIndexed(key) {
		return false
	}
	return s.skip(0)
}

// indexedNames are the JSON names of kvIndexed's fields.
var indexedNames = [...]string{"type", "status", "volume_id", "vm_id", "requested_by", "created_at", "updated_at",
	"completed_at"}

// mayMatchIndexed reports whether encoding/json could match key, not
// exactly an indexed field's name, to one: equal but for case, or with a
// character beyond ASCII (some fold to ASCII letters).
func mayMatchIndexed(key []byte) bool {
	upper := false
	for _, c := range key {
		if c >= utf8.RuneSelf {
			return true
		}
		upper = upper || (c >= 'A' && c <= 'Z')
	}
	if !upper { // the names are in lowercase
		return false
	}
	for _, name := range indexedNames {
		if bytes.EqualFold(key, []byte(name)) {
			return true
		}
	}
	return false
}

// keptString reads a string into *v, or null, which leaves *v as it is
// (encoding/json leaves a string so).
func (s *jsonScanner) keptString(v *[]byte) bool {
	if s.null() {
		return true
	}
	b, ok := s.plainString()
	if ok {
		*v = b
	}
	return ok
}

// time reads a time as encoding/json does: the literal, quotes included,
// given to time.Time's UnmarshalJSON; null leaves *t as it is.
func (s *jsonScanner) time(t *time.Time) bool {
	if s.null() {
		return true
	}
	start := s.i
	if !s.skipString() {
		return false
	}
	return t.UnmarshalJSON(s.b[start:s.i]) == nil
}

// null reads a null if one is next.
func (s *jsonScanner) null() bool {
	if bytes.HasPrefix(s.b[s.i:], []byte("null")) {
		s.i += 4
		return true
	}
	return false
}

// plainString reads a string without escapes, in valid UTF-8, and returns
// its bytes, which encoding/json decodes as they are.
func (s *jsonScanner) plainString() ([]byte, bool) {
	if !s.eat('"') {
		return nil, false
	}
	start := s.i
	s.i = runOf(&scanPlain, s.b, s.i)
	if s.i < len(s.b) && s.b[s.i] == '"' {
		b := s.b[start:s.i]
		s.i++
		return b, true
	}
	// Beyond ASCII, an escape, a control character or the end.
	for ; s.i < len(s.b); s.i++ {
		switch c := s.b[s.i]; {
		case c == '"':
			b := s.b[start:s.i]
			s.i++
			return b, utf8.Valid(b)
		case c == '\\' || c < 0x20:
			return nil, false
		}
	}
	return nil, false
}

// runOf returns the index of the first byte of b from i on that set
// (scanPlain, or scanInString) does not hold, len(b) if none. It skips
// eight bytes at a time while none of them can end the run: a control
// character, a quote, a backslash, or (scanPlain) a byte beyond ASCII.
func runOf(set *[256]bool, b []byte, i int) int {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	plain := set == &scanPlain
	for ; i+8 <= len(b); i += 8 {
		w := binary.LittleEndian.Uint64(b[i:])
		q, bs := w^(ones*'"'), w^(ones*'\\')
		// A byte's high bit is set in stop if it is below 0x20 or
		// equal to a quote or a backslash (and maybe in later bytes
		// then): the usual tests for a byte below n and a zero byte.
		stop := (w-ones*0x20)&^w | (q-ones)&^q | (bs-ones)&^bs
		if plain {
			stop |= w
		}
		if stop&highs != 0 {
			break
		}
	}
	for i < len(b) && set[b[i]] {
		i++
	}
	return i
}

// scanPlain holds the bytes a string holds as they are: ASCII but the
// quote, the backslash and control characters. scanInString adds the
// bytes beyond ASCII.
var scanPlain, scanInString = func() (plain, in [256]bool) {
	for c := range 256 {
		in[c] = c >= 0x20 && c != '"' && c != '\\'
		plain[c] = in[c] && c < utf8.RuneSelf
	}
	return plain, in
}()

// skip checks one value at nesting depth.
func (s *jsonScanner) skip(depth int) bool {
	if s.i >= len(s.b) {
		return false
	}
	switch c := s.b[s.i]; {
	case c == '"':
		return s.skipString()
	case c == '{':
		return s.skipObject(depth + 1)
	case c == '[':
		return s.skipArray(depth + 1)
	case c == '-' || (c >= '0' && c <= '9'):
		return s.skipNumber()
	case c == 't':
		return s.literal("true")
	case c == 'f':
		return s.literal("false")
	case c == 'n':
		return s.literal("null")
	}
	return false
}

func (s *jsonScanner) literal(lit string) bool {
	if bytes.HasPrefix(s.b[s.i:], []byte(lit)) {
		s.i += len(lit)
		return true
	}
	return false
}

func (s *jsonScanner) skipObject(depth int) bool {
	if depth > scanMaxDepth {
		return false
	}
	s.i++ // {
	s.space()
	if s.eat('}') {
		return true
	}
	for {
		s.space()
		if s.i >= len(s.b) || s.b[s.i] != '"' || !s.skipString() {
			return false
		}
		s.space()
		if !s.eat(':') {
			return false
		}
		s.space()
		if !s.skip(depth) {
			return false
		}
		s.space()
		if s.eat(',') {
			continue
		}
		return s.eat('}')
	}
}

func (s *jsonScanner) skipArray(depth int) bool {
	if depth > scanMaxDepth {
		return false
	}
	s.i++ // [
	s.space()
	if s.eat(']') {
		return true
	}
	for {
		s.space()
		if !s.skip(depth) {
			return false
		}
		s.space()
		if s.eat(',') {
			continue
		}
		return s.eat(']')
	}
}

// skipString checks a string, escapes included; encoding/json accepts any
// byte but a control character in it.
func (s *jsonScanner) skipString() bool {
	if !s.eat('"') {
		return false
	}
	for s.i < len(s.b) {
		if s.i = runOf(&scanInString, s.b, s.i); s.i == len(s.b) {
			return false
		}
		c := s.b[s.i]
		s.i++
		switch {
		case c == '"':
			return true
		case c < 0x20:
			return false
		case c == '\\':
			if s.i >= len(s.b) {
				return false
			}
			e := s.b[s.i]
			s.i++
			switch e {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if s.i+4 > len(s.b) {
					return false
				}
				for _, h := range s.b[s.i : s.i+4] {
					if !isHex(h) {
						return false
					}
				}
				s.i += 4
			default:
				return false
			}
		}
	}
	return false
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

// skipNumber checks a number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (s *jsonScanner) skipNumber() bool {
	s.eat('-')
	switch {
	case s.eat('0'):
	case s.i < len(s.b) && s.b[s.i] >= '1' && s.b[s.i] <= '9':
		s.digits()
	default:
		return false
	}
	if s.eat('.') && s.digits() == 0 {
		return false
	}
	if s.eat('e') || s.eat('E') {
		if !s.eat('+') {
			s.eat('-')
		}
		if s.digits() == 0 {
			return false
		}
	}
	return true
}

// digits reads decimal digits and counts them.
func (s *jsonScanner) digits() int {
	start := s.i
	for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
		s.i++
	}
	return s.i - start
}

// space reads JSON's whitespace.
func (s *jsonScanner) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *jsonScanner) eat(c byte) bool {
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

// end reports whether only whitespace is left after the top-level value.
func (s *jsonScanner) end() bool {
	s.space()
	return s.i == len(s.b)
}
