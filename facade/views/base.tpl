<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · Postbox</title>
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
<script src="/dashboard/static/dashboard.js" defer></script>
</head>
<body data-refresh="{{get('refresh', 0)}}">
<header>
  <a class="brand" href="/">Postbox</a>
  % if session is not None:
  <nav>
    <a href="/">Jobs</a>
    <a href="/dashboard/algorithms">Algorithms</a>
    <a href="/dashboard/node">DICOM node</a>
  </nav>
  <form class="logout" method="post" action="/dashboard/logout">
    <span class="who">{{session.key.name}}{{' (site)' if session.key.site else ''}}</span>
    <input type="hidden" name="csrf" value="{{session.csrf}}">
    <button type="submit" id="logout">Sign out</button>
  </form>
  % end
</header>
<main>
<h1>{{title}}</h1>
{{!base}}
</main>
</body>
</html>
