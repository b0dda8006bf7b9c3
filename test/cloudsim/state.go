package cloudsim

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

const (
	vmRunning = "Running"
	vmStopped = "Stopped"

	volAllocated = "Allocated"
	volReady     = "Ready"
	// volSnapshotting and volResizing last while a createSnapshot or a
	// resizeVolume job of the volume runs.
	volSnapshotting = "Snapshotting"
	volResizing     = "Resizing"

	snapCreating  = "Creating"
	snapBackedUp  = "BackedUp"
	snapError     = "Error"
	snapDestroyed = "Destroyed"

	typeData = "DATADISK"
	typeRoot = "ROOT"

	jobPending = 0
	jobSuccess = 1
	jobFailure = 2

	stateFile = "state.json"
	disksDir  = "disks"
)

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

func isUUID(s string) bool { return uuidRE.MatchString(s) }

// volume is a persisted volume.
type volume struct {
	ID         string    `json:"id"`
	Seq        int64     `json:"seq"`
	Name       string    `json:"name"`
	ZoneID     string    `json:"zoneid"`
	Type       string    `json:"type"`
	Size       int64     `json:"size"`
	OfferingID string    `json:"diskofferingid,omitempty"`
	State      string    `json:"state"`
	Created    time.Time `json:"created"`
	// Removed: deleted by deleteVolume; kept so the id still resolves.
	Removed  bool      `json:"removed,omitempty"`
	VMID     string    `json:"vmid,omitempty"`
	DeviceID *int64    `json:"deviceid,omitempty"`
	Attached time.Time `json:"attached,omitzero"`
	// BackingFile and LoopDevice are the local device, when it has one.
	BackingFile string `json:"backingfile,omitempty"`
	LoopDevice  string `json:"loopdevice,omitempty"`
	// SnapshotID is the snapshot the volume was created from.
	SnapshotID string `json:"snapshotid,omitempty"`
}

// resourceTag is a resource tag (createTags).
type resourceTag struct {
	ResourceType string `json:"resourcetype"`
	ResourceID   string `json:"resourceid"`
	Key          string `json:"key"`
	Value        string `json:"value"`
}

// snapshot is a persisted volume snapshot.
type snapshot struct {
	ID       string    `json:"id"`
	Seq      int64     `json:"seq"`
	Name     string    `json:"name"`
	VolumeID string    `json:"volumeid"`
	Size     int64     `json:"size"`
	State    string    `json:"state"`
	Created  time.Time `json:"created"`
	// File is the copy of the volume's backing file, once taken.
	File string `json:"file,omitempty"`
}

// job is a persisted async job.
type job struct {
	ID           string            `json:"id"`
	Command      string            `json:"command"`
	InstanceType string            `json:"instancetype"`
	InstanceID   string            `json:"instanceid"`
	Params       map[string]string `json:"params"`
	Created      time.Time         `json:"created"`
	Due          time.Time         `json:"due"`
	// Hang: the job never finishes. Fail: it fails without effect.
	Hang bool `json:"hang,omitempty"`
	Fail bool `json:"fail,omitempty"`
	// Held: pending until its command's JobHold fault is lifted.
	Held       bool            `json:"held,omitempty"`
	Status     int             `json:"status"`
	ResultCode int             `json:"resultcode"`
	Result     json.RawMessage `json:"result,omitempty"`
	Completed  time.Time       `json:"completed,omitzero"`
	// filed: the ended job is in its file of jobsDir, and no more in the
	// state file.
	filed bool
}

// jobsDir holds one file per ended job, <id>.json, written once: the
// state file keeps the pending jobs only, so that saving it costs what is
// pending, not the whole history of jobs.
const jobsDir = "jobs"

// persisted is everything kept in the state directory.
type persisted struct {
	NextSeq int64              `json:"nextseq"`
	Volumes map[string]*volume `json:"volumes"`
	// Snapshots are kept after deleteSnapshot (state Destroyed) so their
	// ids still resolve.
	Snapshots map[string]*snapshot `json:"snapshots,omitempty"`
	// Tags are the resource tags, in creation order.
	Tags     []resourceTag     `json:"tags,omitempty"`
	VMStates map[string]string `json:"vmstates"`
	Jobs     map[string]*job   `json:"jobs"`
	// Attaches and Detaches count succeeded jobs per volume.
	Attaches map[string]int64 `json:"attaches"`
	Detaches map[string]int64 `json:"detaches"`
}

// newPersisted is the state of a fresh simulator over inv.
func newPersisted(inv *Inventory, now time.Time) *persisted {
	p := &persisted{
		Volumes:   map[string]*volume{},
		Snapshots: map[string]*snapshot{},
		VMStates:  map[string]string{},
		Jobs:      map[string]*job{},
		Attaches:  map[string]int64{},
		Detaches:  map[string]int64{},
	}
	for _, vm := range inv.VMs {
		p.VMStates[vm.ID] = vm.State
		if vm.RootVolume == nil {
			continue
		}
		zero := int64(0)
		p.NextSeq++
		p.Volumes[vm.RootVolume.ID] = &volume{
			ID: vm.RootVolume.ID, Seq: p.NextSeq, Name: "ROOT-" + vm.Name, ZoneID: vm.ZoneID,
			Type: typeRoot, Size: vm.RootVolume.SizeGB << 30, State: volReady, Created: now,
			VMID: vm.ID, DeviceID: &zero, Attached: now,
		}
	}
	for _, dv := range inv.Volumes {
		p.NextSeq++
		v := &volume{ID: dv.ID, Seq: p.NextSeq, Name: dv.Name, ZoneID: dv.ZoneID, Type: typeData,
			Size: dv.SizeGB << 30, State: volReady, Created: now}
		if dv.VMID != "" {
			dev := dv.DeviceID
			v.VMID, v.DeviceID, v.Attached = dv.VMID, &dev, now
		}
		p.Volumes[dv.ID] = v
	}
	return p
}

// loadPersisted reads dir's state file; os.ErrNotExist when there is none.
func loadPersisted(dir string) (*persisted, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	var p persisted
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("parse %s: %w", stateFile, err)
	}
	for _, m := range []*map[string]int64{&p.Attaches, &p.Detaches} {
		if *m == nil {
			*m = map[string]int64{}
		}
	}
	if p.Snapshots == nil { // a state file from before snapshots
		p.Snapshots = map[string]*snapshot{}
	}
	if p.Volumes == nil || p.VMStates == nil || p.Jobs == nil {
		return nil, errors.New("state file lacks volumes, vmstates or jobs")
	}
	// The ended jobs' files; one also in the state file as pending ended
	// after that was saved (the file is written first).
	files, err := filepath.Glob(filepath.Join(dir, jobsDir, "*.json"))
	if err != nil {
		return nil, err
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var j job
		if err := json.Unmarshal(b, &j); err != nil {
			return nil, fmt.Errorf("parse %s: %w", f, err)
		}
		j.filed = true
		p.Jobs[j.ID] = &j
	}
	return &p, nil
}

// save writes the jobs that ended since the last save to their files,
// then the state without them, each atomically: temp file, fsync, rename.
func (p *persisted) save(dir string) error {
	pending := make(map[string]*job, len(p.Jobs))
	for id, j := range p.Jobs {
		switch {
		case j.Status == jobPending:
			pending[id] = j
		case !j.filed:
			b, err := json.Marshal(j)
			if err != nil {
				return fmt.Errorf("encode job %s: %w", id, err)
			}
			if err := writeAtomically(filepath.Join(dir, jobsDir), id+".json", b); err != nil {
				return err
			}
			j.filed = true
		}
	}
	all := p.Jobs
	p.Jobs = pending
	b, err := json.Marshal(p)
	p.Jobs = all
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	return writeAtomically(dir, stateFile, b)
}

// removeJob deletes an ended job's file, when it has one.
func removeJob(dir, id string) error {
	err := os.Remove(filepath.Join(dir, jobsDir, id+".json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// writeAtomically writes b to dir/name: temp file, fsync, rename.
func writeAtomically(dir, name string, b []byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	f, err := os.CreateTemp(dir, name+".tmp*")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	tmp := f.Name()
	_, werr := f.Write(b)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save state: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save state: %w", err)
	}
	return nil
}
