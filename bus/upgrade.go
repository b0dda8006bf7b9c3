package bus

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/internal/upgrade"
)

// StoreFormat is the format of the embedded server's JetStream store this
// release writes: 1, every stream and the state bucket in the volumed
// account. Format 0 is the layout before NATS authorization, when they
// were in the global account ($G).
const StoreFormat = 1

// FormatFile records the store's format, in the JetStream store directory.
const FormatFile = "volumed-format.json"

// globalAccount is the directory of the global account's JetStream files.
const globalAccount = server.DEFAULT_GLOBAL_ACCOUNT

// Headers of a message copied from the global account: the stream and
// sequence it had there.
const (
	migratedFromHeader = "Volumed-Migrated-From"
	migrateBatch       = 256
)

// upgradeStore brings the JetStream store under opts.StoreDir to
// StoreFormat before the embedded server opens it (see internal/upgrade).
func (b *Bus) upgradeStore(ctx context.Context, opts *server.Options) error {
	dir := opts.StoreDir
	plan := upgrade.Plan{Name: "data dir " + dir, Current: StoreFormat,
		Marker: upgrade.FileMarker{Path: filepath.Join(dir, FormatFile)},
		Detect: func(context.Context) (int, error) {
			streams, err := globalStreams(dir)
			switch {
			case err != nil:
				return 0, err
			case len(streams) == 0:
				return StoreFormat, nil
			case opts.Cluster.Port != 0:
				return 0, fmt.Errorf("%w: the global account holds streams %s written before NATS authorization, on a cluster member: "+
					"they move only on a single server (see docs/upgrading.md)", upgrade.ErrRefused, strings.Join(streams, ", "))
			}
			return 0, nil
		},
		Steps: []upgrade.Step{{From: 0, Name: "move the streams and the state bucket from the global account to volumed's",
			Run: func(ctx context.Context, log *slog.Logger) error { return b.moveGlobal(ctx, dir, log) }}},
	}
	if err := plan.Run(ctx, b.cfg.Logger); err != nil {
		return err
	}
	return b.mergeGlobalAgain(ctx, opts)
}

// mergeGlobalAgain merges into volumed's account the streams the global
// account holds in a store already in StoreFormat: an earlier release,
// from before NATS authorization, started on this data dir after an
// upgrade (a downgrade) made them, and recorded there what it accepted
// meanwhile, queued jobs included. A cluster member's are refused, as in
// a store without a format.
func (b *Bus) mergeGlobalAgain(ctx context.Context, opts *server.Options) error {
	streams, err := globalStreams(opts.StoreDir)
	if err != nil || len(streams) == 0 {
		return err
	}
	if opts.Cluster.Port != 0 {
		return fmt.Errorf("upgrade: data dir %s: %w: the global account holds streams %s, written by a release before NATS authorization "+
			"started on it since an upgrade, on a cluster member: they move only on a single server (see docs/upgrading.md)",
			opts.StoreDir, upgrade.ErrRefused, strings.Join(streams, ", "))
	}
	log := b.cfg.Logger.With("component", "upgrade", "data", "data dir "+opts.StoreDir)
	log.Warn("the global account holds streams again: a release before NATS authorization ran on this data dir since it was upgraded; merging them",
		"streams", strings.Join(streams, ","))
	if err := b.moveGlobal(ctx, opts.StoreDir, log); err != nil {
		return fmt.Errorf("upgrade: data dir %s: merge the global account's streams: %w", opts.StoreDir, err)
	}
	return nil
}

// globalStreams lists the streams the global account has under storeDir;
// a directory with a leading dot is a deleted stream the server removes
// (after the move, or at its next start if one was cut short), not one.
func globalStreams(storeDir string) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(storeDir, server.JetStreamStoreDir, globalAccount, "streams"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("bus: read the global account's streams: %w", err)
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// moveGlobal copies every stream of the global account under storeDir
// into the volumed account and deletes it there, on a server of its own
// that no client can reach: the state bucket's records (leases left out)
// where the account has none under that key yet, and the other streams'
// messages in order, under message ids that JetStream deduplicates, each
// batch purged from the old stream once copied. A crash in the middle
// leaves the rest to the next start, and duplicates nothing within the
// streams' deduplication window.
func (b *Bus) moveGlobal(ctx context.Context, storeDir string, log *slog.Logger) error {
	a, err := LoadAuthority(b.cfg.CredsDir)
	if err != nil {
		return err
	}
	accName := pub(a.account)
	oldPass, newPass := rand.Text(), rand.Text()
	acc := server.NewAccount(accName)
	srv, err := server.NewServer(&server.Options{ServerName: "volumed-upgrade", DontListen: true, NoSigs: true, NoLog: true,
		JetStream: true, StoreDir: storeDir, Accounts: []*server.Account{acc},
		Users: []*server.User{{Username: "old", Password: oldPass}, {Username: "new", Password: newPass, Account: acc}}})
	if err != nil {
		return fmt.Errorf("bus: upgrade server: %w", err)
	}
	srv.Start()
	defer func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	}()
	if !srv.ReadyForConnections(15 * time.Second) {
		return errors.New("bus: upgrade server not ready")
	}
	limits := map[string]server.JetStreamAccountLimits{"": {MaxMemory: -1, MaxStore: -1, MaxStreams: -1, MaxConsumers: -1, MaxAckPending: -1}}
	registered, err := srv.LookupAccount(accName)
	if err != nil {
		return fmt.Errorf("bus: upgrade server: %w", err)
	}
	for _, acc := range []*server.Account{srv.GlobalAccount(), registered} {
		if err := acc.EnableJetStream(limits, nil); err != nil {
			return fmt.Errorf("bus: upgrade server: jetstream of account %s: %w", acc.Name, err)
		}
	}
	connect := func(user, pass string) (jetstream.JetStream, error) {
		nc, err := nats.Connect("", nats.InProcessServer(srv), nats.UserInfo(user, pass), nats.Name("volumed-upgrade"))
		if err != nil {
			return nil, fmt.Errorf("bus: upgrade server: connect: %w", err)
		}
		return jetstream.New(nc)
	}
	oldJS, err := connect("old", oldPass)
	if err != nil {
		return err
	}
	defer oldJS.Conn().Close()
	newJS, err := connect("new", newPass)
	if err != nil {
		return err
	}
	defer newJS.Conn().Close()
	names := oldJS.StreamNames(ctx)
	var streams []string
	for name := range names.Name() {
		streams = append(streams, name)
	}
	if err := names.Err(); err != nil {
		return fmt.Errorf("bus: global account's streams: %w", err)
	}
	for _, name := range streams {
		if err := moveStream(ctx, oldJS, newJS, name, log); err != nil {
			return fmt.Errorf("bus: move stream %s: %w", name, err)
		}
	}
	return nil
}

// moveStream copies stream name from oldJS's account into newJS's, making
// it there with the old configuration if it is missing, then deletes the
// old one.
func moveStream(ctx context.Context, oldJS, newJS jetstream.JetStream, name string, log *slog.Logger) error {
	src, err := oldJS.Stream(ctx, name)
	if err != nil {
		return err
	}
	info, err := src.Info(ctx)
	if err != nil {
		return err
	}
	dst, err := newJS.Stream(ctx, name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		cfg := info.Config
		cfg.Sources, cfg.Mirror = nil, nil
		dst, err = newJS.CreateStream(ctx, cfg)
	}
	if err != nil {
		return fmt.Errorf("in volumed's account: %w", err)
	}
	kv := strings.HasPrefix(name, "KV_")
	var copied, skipped int
	var last uint64
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		msg, err := src.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read %d: %w", seq, err)
		}
		var kept bool
		if kv {
			kept, err = copyRecord(ctx, newJS, dst, msg)
		} else {
			kept, err = copyMsg(ctx, newJS, name, info.Created, msg)
		}
		if err != nil {
			return fmt.Errorf("copy %d (%s): %w", seq, msg.Subject, err)
		}
		if kept {
			copied++
		} else {
			skipped++
		}
		last = seq
		if !kv && (copied+skipped)%migrateBatch == 0 {
			if err := src.Purge(ctx, jetstream.WithPurgeSequence(seq+1)); err != nil {
				return fmt.Errorf("purge copied messages: %w", err)
			}
		}
	}
	if err := oldJS.DeleteStream(ctx, name); err != nil {
		return fmt.Errorf("delete the old stream: %w", err)
	}
	log.Info("stream moved from the global account", "stream", name, "copied", copied, "skipped", skipped,
		"last_sequence", last, "into", dst.CachedInfo().Config.Name)
	return nil
}

// copyMsg publishes msg into stream's namesake in the new account under a
// message id of its stream, the stream's creation time and the sequence
// (a stream a downgrade made again numbers its messages from 1 again),
// with its headers; a message on a subject no stream there takes is
// skipped.
func copyMsg(ctx context.Context, js jetstream.JetStream, stream string, created time.Time, msg *jetstream.RawStreamMsg) (bool, error) {
	out := nats.NewMsg(msg.Subject)
	out.Data = msg.Data
	for k, v := range msg.Header {
		if !strings.HasPrefix(k, "Nats-") {
			out.Header[k] = v
		}
	}
	from := stream + ":" + strconv.FormatUint(msg.Sequence, 10)
	out.Header.Set(migratedFromHeader, from)
	id := "volumed-upgrade:" + from + ":" + strconv.FormatInt(created.UnixNano(), 10)
	ack, err := js.PublishMsg(ctx, out, jetstream.WithMsgID(id))
	if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) {
		// No stream of the volumed account takes the subject: the first
		// device stream kept every devices.> message, requests included.
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return !ack.Duplicate, nil
}

// copyRecord writes a bucket record into the new account's bucket unless
// it already has that key (a later write wins) or deleted it after the
// record was written (its delete marker not expired yet): over a key
// deleted before, the record is written. Deletes and leases are not
// copied.
func copyRecord(ctx context.Context, js jetstream.JetStream, dst jetstream.Stream, msg *jetstream.RawStreamMsg) (bool, error) {
	if deleted(msg.Header) || strings.Contains(msg.Subject, ".lease.") {
		return false, nil
	}
	out := nats.NewMsg(msg.Subject)
	out.Data = msg.Data
	var over uint64 // the sequence of an earlier delete marker of the key
	for {
		_, err := js.PublishMsg(ctx, out, jetstream.WithExpectLastSequencePerSubject(over))
		var apiErr *jetstream.APIError
		if !errors.As(err, &apiErr) || apiErr.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequence || over != 0 {
			return err == nil, err
		}
		last, err := dst.GetLastMsgForSubject(ctx, msg.Subject)
		if err != nil {
			return false, fmt.Errorf("read the record there: %w", err)
		}
		if !deleted(last.Header) || !msg.Time.After(last.Time) {
			return false, nil
		}
		over = last.Sequence
	}
}

// deleted reports whether a bucket message is a delete: a KV delete or
// purge, or a marker the server left.
func deleted(h nats.Header) bool {
	op := h.Get("KV-Operation")
	return op == "DEL" || op == "PURGE" || h.Get("Nats-Marker-Reason") != ""
}
