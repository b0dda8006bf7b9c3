package devagent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// TestServerNameOfDiskWithoutDiskseq: on the fake sysfs tree, whose vda
// has no kernel diskseq (the agent numbers its appearances), a name made
// for vda, with or without the identity in the request, goes when the
// agent reports vda removed: the server records the disk's identity as
// the agent knows it, generation included.
func TestServerNameOfDiskWithoutDiskseq(t *testing.T) {
	for _, tc := range []struct {
		name         string
		withIdentity bool
	}{
		{"without identity", false},
		{"with identity", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := copyTree(t)
			src := newFakeSource()
			a, _ := startAgent(t, Config{Source: src, SysRoot: root})
			vda, ok := a.Device("vda")
			if !ok || vda.DiskSeq != 0 || vda.Generation == 0 {
				t.Fatalf("vda = %+v (%v), want a disk without diskseq, with a generation", vda, ok)
			}
			b := testenv.StartBus(t)
			vm, dir := "vm-test", filepath.Join(t.TempDir(), "by-volume")
			srv := NewServer(ServerConfig{VMID: vm, Conn: b.Conn(), JetStream: b.JetStream(), Agent: a,
				Namer: NewNamer(dir), SysRoot: root, Logger: testLogger(t)})
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			if err := srv.Start(ctx); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = srv.Close(context.Background()) })

			name := PersistentName(testUUID)
			req := NamesMessage{Names: map[string]string{name: vda.Path}}
			if tc.withIdentity {
				req.Identities = map[string]commands.DeviceIdentity{name: vda.Identity()}
			}
			body, _ := json.Marshal(req)
			msg, err := b.Conn().Request(commands.DevicesNamesSubject(vm), body, wait)
			if err != nil {
				t.Fatal(err)
			}
			var reply NamesMessage
			if err := json.Unmarshal(msg.Data, &reply); err != nil || reply.Names[name] != vda.Path {
				t.Fatalf("names reply %s (%v), want %s -> %s", msg.Data, err, name, vda.Path)
			}

			size := filepath.Join(root, "devices/pci0000:00/0000:00:04.0/virtio4/block/vda/size")
			if err := os.WriteFile(size, []byte("0\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			src.send(t, Uevent{Action: "remove", Subsystem: "block", DevType: "disk", DevName: "vda", Seqnum: 900}, nil)
			testenv.Eventually(t, wait, func() bool {
				_, err := os.Lstat(filepath.Join(dir, name))
				return errors.Is(err, os.ErrNotExist)
			}, "name of the removed vda (%s) removed", vda.Identity())
		})
	}
}
