% rebase('base.tpl', title=title, session=session)
<table class="facts" id="node">
  % for name, value in facts:
  <tr><th>{{name}}</th><td>{{value}}</td></tr>
  % end
</table>
<h2>Destinations</h2>
<table>
  <thead><tr><th>Name</th><th>AE title</th><th>Host</th><th>Port</th><th>TLS</th></tr></thead>
  % for d in destinations:
  <tr><td>{{d['name']}}</td><td>{{d['ae_title']}}</td><td>{{d['host']}}</td><td>{{d['port']}}</td><td>{{d['tls']}}</td></tr>
  % end
  % if not destinations:
  <tr><td colspan="5" class="empty">None configured.</td></tr>
  % end
</table>
<h2>Pending sends</h2>
<table id="pending">
  <thead><tr><th>Job</th><th>Destination</th><th>Files to go</th><th>Attempts</th><th>Last error</th></tr></thead>
  % for p in pending:
  <tr><td><a href="/dashboard/job/{{p['job']}}">{{p['job']}}</a></td><td>{{p['destination']}}</td><td>{{p['missing']}}</td><td>{{p['attempts']}}</td><td>{{p['error']}}</td></tr>
  % end
  % if not pending:
  <tr><td colspan="5" class="empty">Nothing waiting.</td></tr>
  % end
</table>
% if site:
<h2>Recent associations</h2>
<table id="associations">
  <thead><tr><th>When</th><th>What</th><th>AE title</th><th>Address</th><th>Job</th><th>Instances</th></tr></thead>
  % for a in recent:
  <tr><td>{{a['time']}}</td><td>{{a['action']}}</td><td>{{a['who']}}</td><td>{{a['address']}}</td><td>{{a['job']}}</td><td>{{a['count']}}</td></tr>
  % end
  % if not recent:
  <tr><td colspan="6" class="empty">None in the audit log.</td></tr>
  % end
</table>
% end
