package cloudsim_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestInjectedHTTPErrors: each error kind as cloudstack-go sees it.
func TestInjectedHTTPErrors(t *testing.T) {
	tests := []struct {
		kind string
		want string
	}{
		{cloudsim.ErrorKind530, "CloudStack API error 530"},
		{cloudsim.ErrorKind431, "CloudStack API error 431"},
		{cloudsim.ErrorKindDrop, ""}, // a transport error (*url.Error)
	}
	for _, tc := range tests {
		t.Run(tc.kind, func(t *testing.T) {
			s := startSim(t, cloudsim.Config{Faults: cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{
				"listZones": {Rate: 1, Kind: tc.kind}}}})
			cs := syncClient(s)
			_, err := cs.Zone.ListZones(cs.Zone.NewListZonesParams())
			var uerr *url.Error
			if tc.want == "" && !errors.As(err, &uerr) || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("listZones err = %v, want %q", err, tc.want)
			}
			// Other commands are untouched.
			if _, err := cs.DiskOffering.ListDiskOfferings(cs.DiskOffering.NewListDiskOfferingsParams()); err != nil {
				t.Fatalf("listDiskOfferings: %v", err)
			}
		})
	}
}

// TestDropAfterAttach: the attach happens although the caller got no
// answer; Stats counts exactly one succeeded attach.
func TestDropAfterAttach(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	vol := createVolume(t, cs, "lost-answer", 1)
	if err := s.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{"attachVolume": {Rate: 1, Kind: cloudsim.ErrorKindDropAfter}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(vol, cloudsim.RemoteVMID)); err == nil {
		t.Fatal("attach answered despite drop-after")
	}
	testenv.Eventually(t, 10*time.Second, func() bool { return s.Stats().AttachesSucceeded[vol] == 1 },
		"the dropped attach still succeeds")
	v, _, err := cs.Volume.GetVolumeByID(vol)
	if err != nil || v.Virtualmachineid != cloudsim.RemoteVMID {
		t.Fatalf("volume = %+v, %v", v, err)
	}
}

// TestOutageAndLatency: an outage drops every API call while the control
// endpoint answers; latency delays only its command.
func TestOutageAndLatency(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	putFaults(t, s, `{"outage": true}`)
	if _, err := cs.Zone.ListZones(cs.Zone.NewListZonesParams()); err == nil {
		t.Fatal("answered during outage")
	}
	putFaults(t, s, `{"latency": {"listZones": "300ms"}}`)
	begin := time.Now()
	if _, err := cs.Zone.ListZones(cs.Zone.NewListZonesParams()); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(begin); d < 300*time.Millisecond {
		t.Fatalf("listZones answered after %v, before the injected 300ms", d)
	}
}

// TestJobFaults: failed jobs have no effect; hung jobs never finish.
func TestJobFaults(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	vol := createVolume(t, cs, "job-faults", 1)

	putFaults(t, s, `{"jobfailurerate": {"attachVolume": 1}}`)
	j, text := attach(t, cs, vol, cloudsim.RemoteVMID, -1)
	if j.Jobstatus != 2 || j.Jobresultcode != 530 || !strings.Contains(text, "injected") {
		t.Fatalf("failed job = %+v", j)
	}
	if v, _, _ := cs.Volume.GetVolumeByID(vol); v.Virtualmachineid != "" || s.Stats().AttachesSucceeded[vol] != 0 {
		t.Fatalf("failed attach had an effect: %+v", v)
	}

	putFaults(t, s, `{"jobhangrate": {"attachVolume": 1}}`)
	r, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(vol, cloudsim.RemoteVMID))
	if err != nil {
		t.Fatal(err)
	}
	putFaults(t, s, `{}`)
	// A later job finishes while the hung one stays pending.
	later := createVolume(t, cs, "later", 1)
	if _, text := attach(t, cs, later, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	q, err := cs.Asyncjob.QueryAsyncJobResult(cs.Asyncjob.NewQueryAsyncJobResultParams(r.JobID))
	if err != nil || q.Jobstatus != 0 {
		t.Fatalf("hung job = %+v, %v", q, err)
	}
	if st := s.Stats(); st.PendingJobs != 1 {
		t.Fatalf("pending jobs = %d", st.PendingJobs)
	}
}

// TestJobHold: a held job stays pending past its due time, while a job
// of another command created after it finishes; it runs once the hold is
// lifted.
func TestJobHold(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	vol := createVolume(t, cs, "held", 1)

	putFaults(t, s, `{"jobhold": {"attachVolume": true}}`)
	r, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(vol, cloudsim.RemoteVMID))
	if err != nil {
		t.Fatal(err)
	}
	createVolume(t, cs, "later", 1) // its job is due after the held one's
	q, err := cs.Asyncjob.QueryAsyncJobResult(cs.Asyncjob.NewQueryAsyncJobResultParams(r.JobID))
	if err != nil || q.Jobstatus != 0 || s.Stats().AttachesSucceeded[vol] != 0 {
		t.Fatalf("held job = %+v, %v", q, err)
	}
	putFaults(t, s, `{}`)
	testenv.Eventually(t, 30*time.Second, func() bool {
		q, err := cs.Asyncjob.QueryAsyncJobResult(cs.Asyncjob.NewQueryAsyncJobResultParams(r.JobID))
		return err == nil && q.Jobstatus == 1
	}, "the released job finished")
	if n := s.Stats().AttachesSucceeded[vol]; n != 1 {
		t.Fatalf("attaches after the release: %d, want 1", n)
	}
}

// TestExpungeJob: a finished job can be forgotten, as CloudStack expunges
// old jobs; queryAsyncJobResult then answers 431 as for an id naming
// nothing. A pending job is kept.
func TestExpungeJob(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	r, err := cs.Volume.CreateVolume(createParams(cs, "expunged", 1))
	if err != nil {
		t.Fatal(err)
	}
	if s.ExpungeJob(r.JobID) {
		t.Fatal("a pending job was expunged")
	}
	waitJob(t, cs, r.JobID)
	if !s.ExpungeJob(r.JobID) || s.ExpungeJob(r.JobID) {
		t.Fatal("ExpungeJob does not report one expunged job")
	}
	status, body := signedRequest(t, s, s.SecretKey(), v3(s, "queryAsyncJobResult", map[string]string{"jobid": r.JobID}))
	if status != 431 || !strings.Contains(string(body), "entity does not exist") {
		t.Fatalf("queryAsyncJobResult of an expunged job: %d %s", status, body)
	}
	if v, _, err := cs.Volume.GetVolumeByID(r.Id); err != nil || v.Id != r.Id {
		t.Fatalf("the volume went with its job: %v", err)
	}
}

// TestSeedReproducesFaults: the same seed gives the same fault sequence.
func TestSeedReproducesFaults(t *testing.T) {
	run := func(seed uint64) []bool {
		s := startSim(t, cloudsim.Config{Seed: seed, Faults: cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{
			"listZones": {Rate: 0.5, Kind: cloudsim.ErrorKind530}}}})
		cs := syncClient(s)
		var out []bool
		for range 24 {
			_, err := cs.Zone.ListZones(cs.Zone.NewListZonesParams())
			out = append(out, err == nil)
		}
		return out
	}
	a, b, c := run(7), run(7), run(8)
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("same seed, different runs:\n%v\n%v", a, b)
	}
	if reflect.DeepEqual(a, c) {
		t.Fatalf("seeds 7 and 8 gave the same 24 draws: %v", a)
	}
}

// TestControlEndpoint: GET/PUT faults round-trip, bad faults are rejected,
// stats count calls.
func TestControlEndpoint(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	body := `{"latency":{"*":"10ms"},"errors":{"attachVolume":{"rate":0.25,"kind":"drop-after"}},"jobduration":{"attachVolume":"2s"},"jobfailurerate":{"detachVolume":0.5},"jobhangrate":{"createVolume":0.1}}`
	putFaults(t, s, body)
	resp, err := http.Get(s.ControlURL() + "/faults")
	if err != nil {
		t.Fatal(err)
	}
	var got, want cloudsim.Faults
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if err := json.Unmarshal([]byte(body), &want); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(s.Faults(), want) {
		t.Fatalf("faults = %+v, want %+v", got, want)
	}

	files, _ := filepath.Glob(filepath.Join("testdata", "bad_faults", "*.json"))
	if len(files) == 0 {
		t.Fatal("no bad faults")
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if code := put(t, s.ControlURL()+"/faults", b); code != http.StatusBadRequest {
			t.Errorf("%s: HTTP %d, want 400", f, code)
		}
	}
	if !reflect.DeepEqual(s.Faults(), want) {
		t.Fatal("a rejected PUT changed the faults")
	}

	putFaults(t, s, `{}`)
	for range 3 {
		if _, err := cs.Zone.ListZones(cs.Zone.NewListZonesParams()); err != nil {
			t.Fatal(err)
		}
	}
	resp, err = http.Get(s.ControlURL() + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st cloudsim.Stats
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	if st.Calls["listZones"] != 3 {
		t.Fatalf("stats = %+v", st)
	}
}

// TestParseFaultSpecs covers the flag syntax.
func TestParseFaultSpecs(t *testing.T) {
	d, err := cloudsim.ParseDurations("attachVolume=2s, *=100ms")
	if err != nil || d["attachVolume"] != cloudsim.Duration(2*time.Second) || d["*"] != cloudsim.Duration(100*time.Millisecond) {
		t.Fatalf("durations = %v, %v", d, err)
	}
	r, err := cloudsim.ParseRates("attachVolume=0.5")
	if err != nil || r["attachVolume"] != 0.5 {
		t.Fatalf("rates = %v, %v", r, err)
	}
	e, err := cloudsim.ParseErrorFaults("listVolumes=1:drop,attachVolume=0.3:530")
	if err != nil || e["listVolumes"] != (cloudsim.ErrorFault{Rate: 1, Kind: "drop"}) || e["attachVolume"].Kind != "530" {
		t.Fatalf("errors = %v, %v", e, err)
	}
	for _, bad := range []func() error{
		func() error { _, err := cloudsim.ParseDurations("attachVolume"); return err },
		func() error { _, err := cloudsim.ParseDurations("attachVolume=-1s"); return err },
		func() error { _, err := cloudsim.ParseRates("attachVolume=1.5"); return err },
		func() error { _, err := cloudsim.ParseErrorFaults("attachVolume=0.5"); return err },
		func() error { _, err := cloudsim.ParseErrorFaults("attachVolume=0.5:teapot"); return err },
	} {
		if err := bad(); !errors.Is(err, cloudsim.ErrBadFault) {
			t.Errorf("err = %v, want ErrBadFault", err)
		}
	}
}

func putFaults(t *testing.T, s *cloudsim.Sim, body string) {
	t.Helper()
	if code := put(t, s.ControlURL()+"/faults", []byte(body)); code != http.StatusOK {
		t.Fatalf("PUT faults %s: HTTP %d", body, code)
	}
}

func put(t *testing.T, u string, body []byte) int {
	t.Helper()
	req, err := http.NewRequest(http.MethodPut, u, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}
