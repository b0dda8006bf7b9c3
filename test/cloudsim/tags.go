package cloudsim

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Resource types that hold tags here.
const (
	tagVolume   = "Volume"
	tagSnapshot = "Snapshot"
	tagUserVM   = "UserVm"
)

// resourceTypes are CloudStack's ResourceObjectType names a tag request
// accepts (compared without case); only tagVolume, tagSnapshot and
// tagUserVM have resources here.
var resourceTypes = []string{"UserVm", "Template", "VnfTemplate", "ISO", "Volume", "Snapshot", "Backup",
	"Network", "Nic", "LoadBalancer", "PortForwardingRule", "FirewallRule", "SecurityGroup",
	"SecurityGroupRule", "PublicIpAddress", "Project", "Account", "Vpc", "NetworkACL", "StaticRoute",
	"VMSnapshot", "RemoteAccessVpn", "Zone", "ServiceOffering", "Storage", "PrivateGateway",
	"NetworkACLList", "VpnGateway", "CustomerGateway", "VpnConnection", "User", "DiskOffering",
	"AutoScaleVmProfile", "AutoScaleVmGroup", "LBStickinessPolicy", "LBHealthCheckPolicy",
	"SnapshotPolicy", "GuestOs", "NetworkOffering", "VpcOffering", "Domain", "ObjectStore", "Bucket"}

// resourceType is ResourceManagerUtil.getResourceType.
func resourceType(name string) (string, *apiError) {
	for _, t := range resourceTypes {
		if strings.EqualFold(t, name) {
			return t, nil
		}
	}
	return "", errParam("Invalid resource type %s", name)
}

// tags reads a map parameter (name[i].key, name[i].value) in index order.
func (q request) tags(name string) []resourceTag {
	idx := map[int]*resourceTag{}
	for k, vs := range q.v {
		rest, ok := strings.CutPrefix(strings.ToLower(k), name+"[")
		if !ok || len(vs) == 0 {
			continue
		}
		n, field, ok := strings.Cut(rest, "].")
		i, err := strconv.Atoi(n)
		if !ok || err != nil {
			continue
		}
		t := idx[i]
		if t == nil {
			t = &resourceTag{}
			idx[i] = t
		}
		switch field {
		case "key":
			t.Key = vs[0]
		case "value":
			t.Value = vs[0]
		}
	}
	keys := make([]int, 0, len(idx))
	for i := range idx {
		keys = append(keys, i)
	}
	slices.Sort(keys)
	out := make([]resourceTag, 0, len(keys))
	for _, i := range keys {
		if idx[i].Key != "" {
			out = append(out, *idx[i])
		}
	}
	return out
}

func (q request) missing(name string) *apiError {
	return &apiError{Code: 431, CSCode: csPlain,
		Text: fmt.Sprintf("Unable to execute API command %s due to missing parameter %s", strings.ToLower(q.cmd), name)}
}

// createTags and deleteTags check their parameters in the HTTP call; the
// tags are written in the job, all or none.
func (s *Sim) createTags(q request) (any, *apiError) {
	return s.tagJob(q, true)
}

func (s *Sim) deleteTags(q request) (any, *apiError) {
	return s.tagJob(q, false)
}

func (s *Sim) tagJob(q request, tagsRequired bool) (any, *apiError) {
	for _, name := range []string{"resourceids", "resourcetype"} {
		if q.str(name) == "" {
			return nil, q.missing(name)
		}
	}
	if tagsRequired && len(q.tags("tags")) == 0 {
		return nil, q.missing("tags")
	}
	p := map[string]string{"resourceids": q.str("resourceids"), "resourcetype": q.str("resourcetype")}
	for i, t := range q.tags("tags") {
		p[fmt.Sprintf("tags[%d].key", i)] = t.Key
		if t.Value != "" {
			p[fmt.Sprintf("tags[%d].value", i)] = t.Value
		}
	}
	return s.submit(q.cmd, "", "", p)
}

// jobTags reads the tags a tag job was given.
func jobTags(p map[string]string) []resourceTag {
	var out []resourceTag
	for i := 0; ; i++ {
		k, ok := p[fmt.Sprintf("tags[%d].key", i)]
		if !ok {
			return out
		}
		out = append(out, resourceTag{Key: k, Value: p[fmt.Sprintf("tags[%d].value", i)]})
	}
}

// resourceExists reports whether a tagged resource exists (deleted volumes
// do not); s.mu is held.
func (s *Sim) resourceExists(typ, id string) bool {
	switch typ {
	case tagVolume:
		v, ok := s.st.Volumes[id]
		return ok && !v.Removed
	case tagSnapshot:
		sn, ok := s.st.Snapshots[id]
		return ok && sn.State != snapDestroyed
	case tagUserVM:
		_, ok := s.inv.vm(id)
		return ok
	}
	return false
}

// execCreateTags is TaggedResourceManagerImpl.createTags: every tag on
// every resource, or none; execMu is held.
func (s *Sim) execCreateTags(p map[string]string) (map[string]any, *apiError) {
	typ, aerr := resourceType(p["resourcetype"])
	if aerr != nil {
		return nil, aerr
	}
	ids := strings.Split(p["resourceids"], ",")
	s.mu.Lock()
	defer s.mu.Unlock()
	var add []resourceTag
	for _, t := range jobTags(p) {
		for _, id := range ids {
			if !s.resourceExists(typ, id) {
				return nil, errParam("Unable to find resource by uuid %s and type %s", id, typ)
			}
			if t.Value == "" {
				return nil, errParam("Value for the key %s is either null or empty", t.Key)
			}
			nt := resourceTag{ResourceType: typ, ResourceID: id, Key: t.Key, Value: t.Value}
			if slices.ContainsFunc(append(s.st.Tags, add...), func(o resourceTag) bool {
				return o.ResourceType == typ && o.ResourceID == id && strings.EqualFold(o.Key, t.Key)
			}) {
				return nil, errInternal("tag %s already on %s with id %s", t.Key, typ, id)
			}
			add = append(add, nt)
		}
	}
	s.st.Tags = append(s.st.Tags, add...)
	return map[string]any{"success": true}, nil
}

// execDeleteTags is TaggedResourceManagerImpl.deleteTags: without tags
// every tag of the resources goes; a tag without a value matches any
// value; keys and values compare without case. Nothing to delete fails.
func (s *Sim) execDeleteTags(p map[string]string) (map[string]any, *apiError) {
	typ, aerr := resourceType(p["resourcetype"])
	if aerr != nil {
		return nil, aerr
	}
	ids := strings.Split(p["resourceids"], ",")
	want := jobTags(p)
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := s.st.Tags[:0:0]
	for _, t := range s.st.Tags {
		if t.ResourceType != typ || !slices.Contains(ids, t.ResourceID) || !matchesAny(t, want) {
			kept = append(kept, t)
		}
	}
	if len(kept) == len(s.st.Tags) {
		return nil, errInternal("Failed to delete tags")
	}
	s.st.Tags = kept
	return map[string]any{"success": true}, nil
}

// matchesAny reports whether t is one of want (all when want is empty).
func matchesAny(t resourceTag, want []resourceTag) bool {
	if len(want) == 0 {
		return true
	}
	for _, w := range want {
		if strings.EqualFold(t.Key, w.Key) && (w.Value == "" || strings.EqualFold(t.Value, w.Value)) {
			return true
		}
	}
	return false
}

// hasAnyTag is the tags filter of list commands: the resource has one of
// the given key/value pairs (CloudStack ORs them), without case; s.mu is
// held.
func (s *Sim) hasAnyTag(typ, id string, want []resourceTag) bool {
	for _, t := range s.st.Tags {
		if t.ResourceType != typ || t.ResourceID != id {
			continue
		}
		for _, w := range want {
			if strings.EqualFold(t.Key, w.Key) && strings.EqualFold(t.Value, w.Value) {
				return true
			}
		}
	}
	return false
}

// tagJSON renders a tag as CloudStack's ResourceTagResponse.
func tagJSON(t resourceTag) map[string]any {
	return map[string]any{"key": t.Key, "value": t.Value, "resourcetype": t.ResourceType,
		"resourceid": t.ResourceID, "account": accountName, "domainid": domainID, "domain": domainName}
}

// tagsJSON renders a resource's tags; s.mu is held.
func (s *Sim) tagsJSON(typ, id string) []map[string]any {
	out := []map[string]any{}
	for _, t := range s.st.Tags {
		if t.ResourceType == typ && t.ResourceID == id {
			out = append(out, tagJSON(t))
		}
	}
	return out
}

func (s *Sim) listTags(q request) (any, *apiError) {
	typ := q.str("resourcetype")
	if typ != "" {
		var aerr *apiError
		if typ, aerr = resourceType(typ); aerr != nil {
			return nil, aerr
		}
	}
	id, key, value, keyword := q.str("resourceid"), q.str("key"), q.str("value"), q.str("keyword")
	s.mu.Lock()
	defer s.mu.Unlock()
	var items []map[string]any
	for _, t := range s.st.Tags {
		if (typ != "" && t.ResourceType != typ) || (id != "" && t.ResourceID != id) ||
			(key != "" && !strings.EqualFold(t.Key, key)) || (value != "" && !strings.EqualFold(t.Value, value)) ||
			(keyword != "" && !strings.Contains(strings.ToLower(t.Key+" "+t.Value), strings.ToLower(keyword))) {
			continue
		}
		items = append(items, tagJSON(t))
	}
	return listAnswer(q, "tag", items)
}
