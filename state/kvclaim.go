package state

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/internal/jsget"
)

// A device claim is the key dev.<base64url(vm)>.<base64url(path)>; its
// value is the volume whose mapping holds the device path on the VM, ""
// when none does. A mapping and the claims it takes and gives up are
// written in one JetStream atomic batch, each message conditioned on its
// key's last revision, so two processes cannot give one device to two
// volumes.
const kvClaimPrefix = "dev."

// claimKey is the claim key of a device path on a VM.
func claimKey(vmID, devicePath string) string {
	return kvClaimPrefix + base64.RawURLEncoding.EncodeToString([]byte(vmID)) + "." +
		base64.RawURLEncoding.EncodeToString([]byte(devicePath))
}

// kvLast is the last message of a key: its revision (0 for none), and its
// value unless it is a delete marker.
type kvLast struct {
	rev  uint64
	live bool
	data []byte
}

// last reads the last message of key, delete markers included, which
// conditional writes must name. An invalid key is jetstream.ErrInvalidKey,
// as from the KeyValue API: it must not reach the subject as a wildcard.
func (k *KV) last(ctx context.Context, key string) (kvLast, error) {
	if !validKey(key) {
		return kvLast{}, kvErr("read "+key, jetstream.ErrInvalidKey)
	}
	msg, err := jsget.Last(ctx, k.js, k.stream, k.subject(key))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return kvLast{}, nil
	}
	if err != nil {
		return kvLast{}, kvErr("read "+key, err)
	}
	return kvLast{rev: msg.Sequence, live: !isDelete(msg.Header), data: msg.Data}, nil
}

// validKey reports whether key is a valid KV key, by the KeyValue API's
// rule (letters, digits, "-/_=" and single dots inside), without its
// regular expression, which was a tenth of every read's cost.
func validKey(key string) bool {
	if key == "" || key[0] == '.' || key[len(key)-1] == '.' || strings.Contains(key, "..") {
		return false
	}
	for i := 0; i < len(key); i++ {
		switch c := key[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '-', c == '/', c == '_', c == '=', c == '.':
		default:
			return false
		}
	}
	return true
}

// isDelete reports whether a bucket message with headers h deletes its
// key: a KV delete or purge, or a marker the server left when the key's
// TTL ran out.
func isDelete(h nats.Header) bool {
	return h.Get(kvOperationHeader) != "" || h.Get(jetstream.MarkerReasonHeader) != ""
}

// subject is the stream subject of a key.
func (k *KV) subject(key string) string { return "$KV." + k.bucket + "." + key }

// Headers of KV messages and atomic batches.
const (
	kvOperationHeader = "KV-Operation"
	batchIDHeader     = "Nats-Batch-Id"
	batchSeqHeader    = "Nats-Batch-Sequence"
	batchCommitHeader = "Nats-Batch-Commit"
	expectLastSubject = "Nats-Expected-Last-Subject-Sequence"
)

// kvWrite is one message of a batch: a value, or a purge when purge is
// set; expect is the key's last revision it replaces (0: none).
type kvWrite struct {
	key    string
	data   []byte
	purge  bool
	expect uint64
}

// errBatchStale: a key of the batch had another revision; nothing was
// written.
var errBatchStale = errors.New("a key of the batch changed")

// batch writes ws as one atomic batch and returns the revision of the
// first write (the writes take consecutive revisions). A single write is
// one conditional publish, as atomic as a batch of one: the server opens
// a batch in a store of its own (on disk, for a file stream) and costs
// several times as much.
func (k *KV) batch(ctx context.Context, ws []kvWrite) (uint64, error) {
	if len(ws) == 1 {
		return k.single(ctx, ws[0])
	}
	nc := k.js.Conn()
	id := uuid.NewString()
	for i, w := range ws {
		m := k.writeMsg(w)
		m.Header.Set(batchIDHeader, id)
		m.Header.Set(batchSeqHeader, strconv.Itoa(i+1))
		switch {
		case i == len(ws)-1:
			m.Header.Set(batchCommitHeader, "1")
			reply, err := nc.RequestMsgWithContext(ctx, m)
			if err != nil {
				return 0, kvErr("batch", err)
			}
			var ack struct {
				Seq   uint64 `json:"seq"`
				Count int    `json:"count"`
				Error *struct {
					ErrCode     int    `json:"err_code"`
					Description string `json:"description"`
				} `json:"error"`
			}
			if err := json.Unmarshal(reply.Data, &ack); err != nil {
				return 0, fmt.Errorf("state: kv batch ack %q: %w", reply.Data, err)
			}
			if ack.Error != nil && isWrongLast(ack.Error.ErrCode) {
				return 0, errBatchStale
			}
			if ack.Error != nil {
				return 0, fmt.Errorf("state: kv batch: %w: %s (%d of %d)", ErrUnavailable, ack.Error.Description, ack.Count, len(ws))
			}
			if ack.Count != len(ws) {
				return 0, fmt.Errorf("state: kv batch: %w: %d of %d written", ErrUnavailable, ack.Count, len(ws))
			}
			k.writes.Add(1)
			return ack.Seq - uint64(len(ws)) + 1, nil
		case i == 0:
			// The first message is acknowledged (empty) once the batch is
			// open, or refused at once.
			reply, err := nc.RequestMsgWithContext(ctx, m)
			if err != nil {
				return 0, kvErr("batch", err)
			}
			if len(reply.Data) > 0 {
				return 0, fmt.Errorf("state: kv batch refused: %s", reply.Data)
			}
		default:
			if err := nc.PublishMsg(m); err != nil {
				return 0, kvErr("batch", err)
			}
		}
	}
	return 0, errors.New("state: kv batch: no writes")
}

// writeMsg is the message of w, conditioned on its key's revision.
func (k *KV) writeMsg(w kvWrite) *nats.Msg {
	m := nats.NewMsg(k.subject(w.key))
	m.Data = w.data
	if w.purge {
		m.Header.Set(kvOperationHeader, "PURGE")
		m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
		m.Header.Set(jetstream.MsgTTLHeader, kvMarkerTTL.String())
	}
	m.Header.Set(expectLastSubject, strconv.FormatUint(w.expect, 10))
	return m
}

// single writes w alone and returns its revision; errBatchStale when its
// key had another revision.
func (k *KV) single(ctx context.Context, w kvWrite) (uint64, error) {
	ack, err := k.js.PublishMsg(ctx, k.writeMsg(w))
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && isWrongLast(int(apiErr.ErrorCode)) {
		return 0, errBatchStale
	}
	if err != nil {
		return 0, kvErr("write "+w.key, err)
	}
	k.writes.Add(1)
	return ack.Sequence, nil
}

// mappingWrites adds to ws the claim writes that move a volume's device
// from old (nil: none) to m (nil: deleted). ErrConflict if another
// volume holds m's device.
func (k *KV) mappingWrites(ctx context.Context, ws []kvWrite, volumeID string, old, m *commands.Mapping) ([]kvWrite, error) {
	if m != nil && m.DevicePath != "" {
		key := claimKey(m.VMID, m.DevicePath)
		c, err := k.last(ctx, key)
		if err != nil {
			return nil, err
		}
		if holder := string(c.data); c.live && holder != "" && holder != volumeID {
			held, err := k.holds(ctx, holder, m)
			if err != nil {
				return nil, err
			}
			if held {
				return nil, fmt.Errorf("state: device %s of volume %s held by %s: %w", m.DevicePath, volumeID, holder, ErrConflict)
			}
			// A claim left behind by a writer that kept no claims (an
			// older volumed): taken over, on its revision like any other.
		}
		ws = append(ws, kvWrite{key: key, data: []byte(volumeID), expect: c.rev})
	}
	if old != nil && old.DevicePath != "" && (m == nil || old.DevicePath != m.DevicePath || old.VMID != m.VMID) {
		key := claimKey(old.VMID, old.DevicePath)
		c, err := k.last(ctx, key)
		if err != nil {
			return nil, err
		}
		if c.live && string(c.data) == volumeID {
			ws = append(ws, kvWrite{key: key, data: []byte{}, expect: c.rev})
		}
	}
	return ws, nil
}

// holds reports whether the recorded mapping of volume holder has m's
// device path on m's VM. A writer of holder's mapping writes the claim in
// the same batch, so taking over a claim its holder's mapping no longer
// backs races with no such write unnoticed.
func (k *KV) holds(ctx context.Context, holder string, m *commands.Mapping) (bool, error) {
	h, err := k.last(ctx, kvMappingPrefix+holder)
	if err != nil || !h.live {
		return false, err
	}
	hm, err := decodeRecord[commands.Mapping](kvMappingPrefix+holder, holder, h.data)
	if err != nil {
		return false, err
	}
	return hm.VMID == m.VMID && hm.DevicePath == m.DevicePath, nil
}

// PutMapping writes m and the device claims it takes and gives up in one
// atomic batch, on the mapping's revision m.Revision (0: none) and the
// claims' revisions; ErrConflict if another volume's mapping holds its
// device path on the VM.
func (k *KV) PutMapping(ctx context.Context, m commands.Mapping) (commands.Mapping, error) {
	if err := checkMapping(m); err != nil {
		return m, err
	}
	data, err := json.Marshal(m)
	if err != nil {
		return m, fmt.Errorf("state: encode mapping %s: %w", m.VolumeID, err)
	}
	key := kvMappingPrefix + m.VolumeID
	cur, err := k.last(ctx, key)
	if err != nil {
		return m, err
	}
	var old *commands.Mapping
	switch {
	case m.Revision == 0 && cur.live:
		return m, fmt.Errorf("state: mapping %s exists: %w", key, ErrStale)
	case m.Revision != 0 && !cur.live:
		return m, gone("mapping", key)
	case m.Revision != 0 && cur.rev != m.Revision:
		return m, stale("mapping", key, m.Revision)
	case cur.live:
		if old, err = oldMapping(key, m.VolumeID, cur.data); err != nil {
			return m, err
		}
	}
	ws, err := k.mappingWrites(ctx, []kvWrite{{key: key, data: data, expect: cur.rev}}, m.VolumeID, old, &m)
	if err != nil {
		return m, err
	}
	rev, err := k.batch(ctx, ws)
	if errors.Is(err, errBatchStale) {
		return m, k.classify(ctx, key, cur.rev, &m)
	}
	if err != nil {
		return m, err
	}
	m.Revision = rev
	return m, k.applyMapping(m.VolumeID, rev, data, false)
}

// oldMapping decodes the record a write replaces; a corrupt one is
// replaced as if there were none (it holds no claim this store can
// name), so a compare-and-swap on its revision repairs it.
func oldMapping(key, volumeID string, raw []byte) (*commands.Mapping, error) {
	old, err := decodeRecord[commands.Mapping](key, volumeID, raw)
	if errors.Is(err, ErrCorrupt) {
		return nil, nil
	}
	return old, err
}

// classify explains a refused batch: the mapping changed since revision
// rev (ErrStale), or m's device was taken meanwhile (ErrConflict).
func (k *KV) classify(ctx context.Context, key string, rev uint64, m *commands.Mapping) error {
	cur, err := k.last(ctx, key)
	if err != nil {
		return err
	}
	if cur.rev == rev && m != nil && m.DevicePath != "" {
		if c, err := k.last(ctx, claimKey(m.VMID, m.DevicePath)); err == nil && c.live && len(c.data) > 0 && string(c.data) != m.VolumeID {
			return fmt.Errorf("state: device %s of volume %s taken by %s: %w", m.DevicePath, m.VolumeID, c.data, ErrConflict)
		}
	}
	return stale("mapping", key, rev)
}

// DeleteMapping purges the volume's mapping key (at revision rev unless
// 0) and frees its device claim in one atomic batch.
func (k *KV) DeleteMapping(ctx context.Context, volumeID string, rev uint64) error {
	key := kvMappingPrefix + volumeID
	for {
		cur, err := k.last(ctx, key)
		if err != nil {
			return err
		}
		if !cur.live {
			return nil
		}
		if rev != 0 && cur.rev != rev {
			return stale("mapping", key, rev)
		}
		old, err := oldMapping(key, volumeID, cur.data)
		if err != nil {
			return err
		}
		ws, err := k.mappingWrites(ctx, []kvWrite{{key: key, purge: true, expect: cur.rev}}, volumeID, old, nil)
		if err != nil {
			return err
		}
		_, err = k.batch(ctx, ws)
		if errors.Is(err, errBatchStale) {
			if rev != 0 {
				return stale("mapping", key, rev)
			}
			continue // unconditional: delete what is there now
		}
		if err != nil {
			return err
		}
		// The batch's purge has no entry here yet: unindex the revision it
		// replaced unless the watcher has already moved past it.
		k.mu.Lock()
		if e := k.mappings[volumeID]; e.v != nil && e.rev == cur.rev {
			k.setMapping(volumeID, kvEntry[commands.Mapping]{rev: cur.rev})
		}
		k.mu.Unlock()
		return nil
	}
}

// claimLoaded gives the mappings loaded at start, written before claims
// existed, the claims of their devices where nobody holds them.
func (k *KV) claimLoaded(ctx context.Context) error {
	k.mu.RLock()
	var ms []commands.Mapping
	for _, e := range k.mappings {
		if e.v != nil && e.v.DevicePath != "" {
			ms = append(ms, *e.v)
		}
	}
	k.mu.RUnlock()
	for _, m := range ms {
		key := claimKey(m.VMID, m.DevicePath)
		if err := formation.Wait(ctx, k.log, "device claim "+key, func(ctx context.Context) error {
			return k.claimFree(ctx, key, m.VolumeID)
		}); err != nil {
			return err
		}
	}
	return nil
}

// claimFree writes the claim key for volumeID unless someone holds it.
// Asked again after an unanswered write, it finds the claim written.
func (k *KV) claimFree(ctx context.Context, key, volumeID string) error {
	c, err := k.last(ctx, key)
	if err != nil {
		return err
	}
	if c.live && len(c.data) > 0 {
		return nil
	}
	if _, err := k.batch(ctx, []kvWrite{{key: key, data: []byte(volumeID), expect: c.rev}}); err != nil && !errors.Is(err, errBatchStale) {
		return err
	}
	return nil
}
